"""Depth rules (docs/rules.md: depth, HyperP): Depth-μP (α = 1/2), CompleteP (α = 1) and HyperP's
1/√(2L) branches. At r = depth/base_depth = 4 and width_mult m = 4 every optimizer multiplier per
group label and the branch multiplier equal numbers computed by hand here; at r = 1 Depth-μP and
CompleteP are μP bit for bit (multipliers, init and training); the configs that cannot hold a depth
or sphere rule fail with one line naming the field; Hydra's `param=hyperp` picks MuonH."""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from families import column
from flax import nnx

import experiments.train
from experiments.compose import compose, to_run_config
from optim import AdamWConfig, MuonConfig, MuonHConfig, RoleMultipliers
from scaling.config import ConfigError, ModelConfig, ParamConfig, RunConfig, from_dict, validate
from scaling.parametrization import build_model, make_parametrization
from scaling.steps import make_step

VOCAB = 256
HEAD_DIM = 16
BASE_WIDTH, BASE_DEPTH = 16, 2
M = R = 4  # width_mult and depth ratio r of the "4x" shape
WIDTH, DEPTH = M * BASE_WIDTH, R * BASE_DEPTH
ALPHA = {"depth_mup": 0.5, "completep": 1.0}
FAMILIES = ["adam", "sgd", "muon", "sphere"]
UPDATE_SCALES = ["keller", "spectral", "moonlight"]
LABELS = {"input", "hidden.block", "vector.block", "vector", "output"}


def _parametrization(name: str, width: int = WIDTH, depth: int = DEPTH,
                     base_width: int = BASE_WIDTH, base_depth: int = BASE_DEPTH):
    cfg = ModelConfig(kind="transformer", width=width, depth=depth, head_dim=HEAD_DIM)
    return make_parametrization(cfg, ParamConfig(name, base_width, base_depth), VOCAB)


def _mults(lr, eps, wd) -> RoleMultipliers:
    return RoleMultipliers(lr=lr, eps=eps, weight_decay=wd)


def expected_multipliers(family: str, alpha: float | None,
                         update_scale: str | None = None) -> dict[str, RoleMultipliers]:
    """Hand-computed per group label at m = 4 and r = 4 (alpha None: no depth factor at all).

    Width part (μP): hidden Adam LR 1/m, ε 1/m, WD m; SGD LR input/output/vectors × m, vector
    SGD WD 1/m; Muon hidden keller/spectral 1, moonlight m^(−1/2); sphere hidden and output 1.
    Depth part (docs/rules.md: depth), on block parameters only: Adam-like LR r^(α−1), ε r^(−α), SGD LR r^(2α−1)."""
    lr_d, eps_d, sgd_d = (1.0, 1.0, 1.0) if alpha is None else (
        R ** (alpha - 1), R ** (-alpha), R ** (2 * alpha - 1))
    adam = {"input": _mults(1, 1, 1), "output": _mults(1, 1, 1), "vector": _mults(1, 1, 0),
            "vector.block": _mults(lr_d, eps_d, 0)}
    if family == "adam":
        return {**adam, "hidden.block": _mults(1 / M * lr_d, 1 / M * eps_d, M)}
    if family == "sgd":
        return {"input": _mults(M, 1, 1), "output": _mults(M, 1, 1),
                "vector": _mults(M, 1, 1 / M), "vector.block": _mults(M * sgd_d, 1, 1 / M),
                "hidden.block": _mults(1 * sgd_d, 1, 1)}
    if family == "muon":
        width_lr = M**-0.5 if update_scale == "moonlight" else 1.0
        return {**adam, "hidden.block": _mults(width_lr * lr_d, 1, 1)}
    assert family == "sphere"
    return {**adam, "hidden.block": _mults(1 * lr_d, 1 / M * eps_d, 1),
            "output": _mults(1, 1, 1)}


def _assert_multipliers(got: dict[str, RoleMultipliers], expected: dict[str, RoleMultipliers]):
    assert set(got) == set(expected) == LABELS
    for label, mult in expected.items():
        for field in ("lr", "eps", "weight_decay"):
            assert getattr(got[label], field) == pytest.approx(getattr(mult, field), rel=1e-12), (
                label, field, got[label])


FAMILY_CASES = [("adam", None), ("sgd", None), *[("muon", s) for s in UPDATE_SCALES],
                ("sphere", None)]
FAMILY_IDS = [family if scale is None else f"muon-{scale}" for family, scale in FAMILY_CASES]


# ---------------------------------------------------------------- (1) r = 4, m = 4: the table


@pytest.mark.parametrize("family, update_scale", FAMILY_CASES, ids=FAMILY_IDS)
@pytest.mark.parametrize("name", sorted(ALPHA))
def test_depth_rule_multipliers_at_r_4(name, family, update_scale):
    """Depth-μP and CompleteP at width and depth 4x their bases: every group's LR, ε and WD
    multiplier is the hand-computed μP width factor times r^(α−1) (Adam, Muon, sphere), r^(2α−1)
    (SGD) or r^(−α) (ε) on block parameters only; the vector outside blocks, the input and the
    output take no depth factor, and hidden WD stays m = 4."""
    got = _parametrization(name).optimizer_multipliers(column(family, update_scale=update_scale))
    _assert_multipliers(got, expected_multipliers(family, ALPHA[name], update_scale))


def test_depth_rule_hand_values_spelled_out():
    """A few of the numbers above written as plain literals, in case the formula is wrong too:
    Depth-μP hidden Adam LR 1/4·4^(−1/2) = 1/8, ε 1/8; CompleteP hidden LR 1/4, ε 1/16; CompleteP
    SGD hidden LR 4; moonlight under Depth-μP 1/2·1/2 = 1/4; block vector LR 1/2 and 1."""
    dmup, cp = _parametrization("depth_mup"), _parametrization("completep")
    assert dmup.optimizer_multipliers(column("adam"))["hidden.block"] == _mults(0.125, 0.125, 4)
    assert dmup.optimizer_multipliers(column("adam"))["vector.block"] == _mults(0.5, 0.5, 0)
    assert cp.optimizer_multipliers(column("adam"))["hidden.block"] == _mults(0.25, 0.0625, 4)
    assert cp.optimizer_multipliers(column("adam"))["vector.block"] == _mults(1, 0.25, 0)
    assert cp.optimizer_multipliers(column("sgd"))["hidden.block"] == _mults(4, 1, 1)
    assert dmup.optimizer_multipliers(column("sgd"))["hidden.block"] == _mults(1, 1, 1)
    assert dmup.optimizer_multipliers(column("muon", update_scale="moonlight"))["hidden.block"].lr == 0.25
    assert dmup.optimizer_multipliers(column("sphere"))["hidden.block"].lr == 0.5
    assert cp.optimizer_multipliers(column("sphere"))["hidden.block"].lr == 1.0


@pytest.mark.parametrize("name, expected", [("depth_mup", 0.5), ("completep", 0.25),
                                            ("mup", 1.0), ("sp", 1.0)])
def test_branch_multiplier_at_r_4(name, expected):
    """Residual branches × r^(−α): 4^(−1/2) = 1/2 for Depth-μP, 1/4 for CompleteP, 1 without
    a depth rule; the width-side logit multiplier stays μP's 1/m."""
    parametrization = _parametrization(name)
    assert parametrization.branch_multiplier == pytest.approx(expected, rel=1e-12)
    if name != "sp":
        assert parametrization.logit_multiplier == pytest.approx(1 / M, rel=1e-12)


@pytest.mark.parametrize("depth", [2, 8])
def test_hyperp_branch_multiplier_is_absolute(depth):
    """HyperP: branches × 1/√(2L) at every depth, the base depth included (L = 2 gives 1/2, not
    1), in the built model too; logit multiplier 1 at width 4x base."""
    parametrization = _parametrization("hyperp", depth=depth)
    assert parametrization.branch_multiplier == pytest.approx((2 * depth) ** -0.5, rel=1e-12)
    assert parametrization.logit_multiplier == 1.0
    if depth == BASE_DEPTH:
        # the shapes of _eq_cfgs below, whose eager init ops are then compiled once
        model, _ = build_model(ModelConfig(width=EQ_WIDTH, depth=depth, head_dim=HEAD_DIM),
                               ParamConfig("hyperp", BASE_WIDTH, BASE_DEPTH), VOCAB, seed=0)
        assert model.branch_multiplier == pytest.approx(0.5, rel=1e-12)


@pytest.mark.parametrize("family, update_scale", FAMILY_CASES, ids=FAMILY_IDS)
def test_hyperp_multipliers_have_no_depth_factor(family, update_scale):
    """HyperP's depth LR law is global (scaling-transfer), so its per-group multipliers at L = 8
    are those at L = 2 and μP's width-only numbers at m = 4."""
    at = {depth: _parametrization("hyperp", depth=depth).optimizer_multipliers(
        column(family, update_scale=update_scale)) for depth in (BASE_DEPTH, DEPTH)}
    assert at[BASE_DEPTH] == at[DEPTH]
    _assert_multipliers(at[DEPTH], expected_multipliers(family, None, update_scale))


# ---------------------------------------------------------------- (2) r = 1: μP bit for bit

EQ_WIDTH, EQ_BASE_WIDTH, EQ_DEPTH = 64, 32, 2  # width_mult 2, depth at its base


def _eq_cfgs(name: str) -> tuple[ModelConfig, ParamConfig]:
    return (ModelConfig(kind="transformer", width=EQ_WIDTH, depth=EQ_DEPTH, head_dim=HEAD_DIM,
                        compute_dtype="float32"),
            ParamConfig(name, EQ_BASE_WIDTH, EQ_DEPTH))


@pytest.mark.parametrize("name", sorted(ALPHA))
def test_depth_rules_at_base_depth_multipliers_equal_mup(name):
    """At r = 1 every family's multipliers (each Muon update scale too), the branch, logit and
    attention factors are μP's exactly (==, not approx)."""
    model_cfg, param_cfg = _eq_cfgs(name)
    depth = make_parametrization(model_cfg, param_cfg, VOCAB)
    mup = make_parametrization(model_cfg, _eq_cfgs("mup")[1], VOCAB)
    assert depth.branch_multiplier == 1.0
    assert depth.logit_multiplier == mup.logit_multiplier
    assert depth.attention_scale == mup.attention_scale
    for family, update_scale in FAMILY_CASES:
        assert (depth.optimizer_multipliers(column(family, update_scale=update_scale))
                == mup.optimizer_multipliers(column(family, update_scale=update_scale))), family


@pytest.mark.parametrize("name", sorted(ALPHA))
def test_depth_rules_at_base_depth_init_equals_mup(name):
    """Same seed, same parameters bit for bit, and no branch multiplier in the forward."""
    model, _ = build_model(*_eq_cfgs(name), VOCAB, seed=0)
    mup, _ = build_model(*_eq_cfgs("mup"), VOCAB, seed=0)
    assert model.branch_multiplier == 1.0
    a, b = nnx.split(model)[1].to_pure_dict(), nnx.split(mup)[1].to_pure_dict()
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


TRAIN_STEPS = 3
EQ_OPTIMIZERS = {
    "adamw": AdamWConfig(lr=1e-2, weight_decay=0.1, warmup_steps=1),
    "muon": MuonConfig(lr=0.02, weight_decay=0.1, warmup_steps=1),
}


def _batch(B: int = 4, T: int = 16) -> tuple[jax.Array, jax.Array]:
    tokens_BxT1 = (jnp.arange(B * (T + 1)) * 7 % VOCAB).reshape(B, T + 1)
    return tokens_BxT1[:, :-1], tokens_BxT1[:, 1:]


@functools.cache
def _train(name: str, optim_name: str):
    """(init params, losses of each step, params after TRAIN_STEPS steps) on one fixed batch."""
    optim_cfg = EQ_OPTIMIZERS[optim_name]
    model, parametrization = build_model(*_eq_cfgs(name), VOCAB, seed=0)
    graphdef, params = nnx.split(model)
    init = jax.device_get(params.to_pure_dict())
    train_step = make_step(optim_cfg, parametrization, graphdef, total_steps=TRAIN_STEPS)
    state = train_step.init_state(params.to_pure_dict(), optim_cfg.lr)
    losses = []
    for _ in range(TRAIN_STEPS):
        before = float(state.loss_sum)
        state, _ = train_step(state, *_batch())
        losses.append(np.float32(state.loss_sum) - np.float32(before))
    return init, np.array(losses), jax.device_get(state.params)


@pytest.mark.parametrize("optim_name", sorted(EQ_OPTIMIZERS))
@pytest.mark.parametrize("name", sorted(ALPHA))
def test_depth_rules_at_base_depth_train_like_mup(name, optim_name):
    """3 steps of AdamW or Muon at r = 1: bit-identical losses and parameters to μP's."""
    init, losses, params = _train(name, optim_name)
    _, mup_losses, mup_params = _train("mup", optim_name)
    moved = [not np.array_equal(a, b)
             for a, b in zip(jax.tree.leaves(init), jax.tree.leaves(params))]
    assert all(moved), "every parameter should have moved"
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    np.testing.assert_array_equal(losses, mup_losses)
    assert jax.tree.structure(params) == jax.tree.structure(mup_params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(mup_params)):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- (4) config errors, one line


def _assert_one_line(error: ConfigError, field: str, value: str, *mentions: str) -> None:
    message = str(error)
    assert "\n" not in message, message
    assert (error.field, error.value) == (field, value), message
    assert message.startswith(f"{field}={value!r}: expected "), message
    for text in mentions:
        assert text in message, (text, message)


# (overrides as nested dicts, field, value, what the message must also name)
CONFIG_ERRORS = {
    "hyperp_zero_readout": ({"param": {"name": "hyperp"}, "model": {"readout_init": "zero"}},
                            "model.readout_init", "zero", ["param.name=hyperp", "normal"]),
    "muonh_zero_readout": ({"optim": {"name": "muonh"}, "model": {"readout_init": "zero"}},
                           "model.readout_init", "zero", ["optim.name=muonh", "normal"]),
    "adamh_zero_readout": ({"optim": {"name": "adamh"}, "model": {"readout_init": "zero"}},
                           "model.readout_init", "zero", ["optim.name=adamh", "normal"]),
    **{f"{name}_mlp": ({"param": {"name": name}, "model": {"kind": "mlp"}}, "model.kind", "mlp",
                       [f"param.name={name}", "transformer"])
       for name in ("depth_mup", "completep", "hyperp")},
}


@pytest.mark.parametrize("case", sorted(CONFIG_ERRORS))
def test_config_error_names_field_value_and_expectation(case):
    """from_dict refuses the config with one line: field=value, what was expected, and the
    other field that makes the value wrong."""
    values, field, value, mentions = CONFIG_ERRORS[case]
    with pytest.raises(ConfigError) as error:
        from_dict(values)
    _assert_one_line(error.value, field, value, *mentions)


def test_validate_refuses_sphere_optimizer_with_zero_readout():
    """validate on a typed RunConfig gives the same error as from_dict."""
    cfg = RunConfig(model=ModelConfig(readout_init="zero"), optim=MuonHConfig())
    with pytest.raises(ConfigError) as error:
        validate(cfg)
    _assert_one_line(error.value, "model.readout_init", "zero", "optim.name=muonh")


@pytest.mark.parametrize("values", [
    {"param": {"name": "hyperp"}},
    {"optim": {"name": "muonh"}},
    {"param": {"name": "completep"}, "optim": {"name": "adamh"}},
    {"param": {"name": "mup"}, "model": {"kind": "mlp", "readout_init": "zero"}},
], ids=["hyperp", "muonh", "completep_adamh", "mup_mlp_zero"])
def test_valid_depth_and_sphere_configs_pass(values):
    """The checks above refuse only what they must: these validate."""
    assert isinstance(from_dict(values), RunConfig)


def test_cli_hyperp_zero_readout_one_line(tiny_run, tmp_path, capsys, monkeypatch):
    """On the command line the same error is one stderr line and no run is written."""
    monkeypatch.setattr(sys, "argv", ["scaling-train"])
    with pytest.raises(SystemExit) as exit_info:
        experiments.train.main([*tiny_run, "param=hyperp", "model.readout_init=zero"])
    assert exit_info.value.code not in (0, None)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("scaling-train: error: model.readout_init='zero': expected"), lines
    assert "param.name=hyperp" in lines[0], lines
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- (5) Hydra


@pytest.mark.parametrize("overrides, expected", [
    (["param=hyperp"], MuonHConfig()),
    (["param=hyperp", "optim=adamw"], AdamWConfig()),
    (["optim=adamw", "param=hyperp"], AdamWConfig()),
], ids=["default_muonh", "adamw_after", "adamw_before"])
def test_hyperp_composes_to_its_optimizer(overrides, expected):
    """`param=hyperp` brings MuonH with its defaults; an explicit optim wins in either order."""
    cfg = to_run_config(compose(overrides))
    assert cfg.param.name == "hyperp"
    assert cfg.model.readout_init == "normal"
    assert cfg.optim == expected


def test_hyperp_readout_carries_mups_one_over_m_in_its_init():
    """Logit multiplier 1 with μP's 1/m folded into the readout: at width 4× base, HyperP's
    readout is μP's (same seed) divided by m, so its std is σ/√base_fan_in / m. A relative step
    does not see the matrix's scale, so on the sphere this is μP's readout."""
    cfg = ModelConfig(width=WIDTH, depth=BASE_DEPTH, head_dim=HEAD_DIM)
    mup, mup_par = build_model(cfg, ParamConfig("mup", BASE_WIDTH, BASE_DEPTH), VOCAB, seed=0)
    hyperp, hyperp_par = build_model(cfg, ParamConfig("hyperp", BASE_WIDTH, BASE_DEPTH), VOCAB,
                                     seed=0)
    assert mup_par.logit_multiplier == pytest.approx(1 / M) and hyperp_par.logit_multiplier == 1
    np.testing.assert_allclose(np.asarray(hyperp.readout[...]),
                               np.asarray(mup.readout[...]) / M, rtol=1e-6)
    assert float(jnp.std(hyperp.readout[...])) == pytest.approx(BASE_WIDTH**-0.5 / M, rel=0.05)
