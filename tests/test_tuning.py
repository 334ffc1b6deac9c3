"""The transferable per-role multipliers (param.*, scaling/rules.py TUNABLE): each keeps μP = SP at
the base shape bit for bit and reaches exactly the place it claims to; a sweep of LR × multiplier
gives back a known 2-D optimum and its drift with width; scaling-transfer carries every tuned
value to the target, and the target's overrides compose back to it through Hydra."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from families import column
from flax import nnx
from synthetic import run_result, write_results

from experiments.compose import compose, sweep_points, to_run_config
from experiments.transfer import command_overrides, plan
from models import label_tree
from optim import AdamWConfig
from scaling.analysis import analyze, format_table
from scaling.config import ConfigError, ModelConfig, ParamConfig
from scaling.parametrization import build_model, build_optimizer
from scaling.plots import plot_analysis
from scaling.rules import TUNABLE

VOCAB, BASE_WIDTH, HEAD_DIM, DEPTH = 256, 32, 16, 2
LR_MULTS = {"input_lr_mult": "input", "output_lr_mult": "output", "vector_lr_mult": "vector"}
ADAM = AdamWConfig(lr=1e-3, schedule="constant", warmup_steps=0, clip_norm=0.0)


def _build(name: str, width: int, **tuned: float):
    cfg = ModelConfig(kind="transformer", width=width, depth=DEPTH, head_dim=HEAD_DIM, context=4)
    return build_model(cfg, ParamConfig(name, BASE_WIDTH, DEPTH, **tuned), VOCAB, seed=0)


def _batch() -> jax.Array:
    return (jnp.arange(4 * 16) * 7 % VOCAB).reshape(4, 16)


@functools.cache
def _outcome(name: str, width: int, field: str | None) -> dict:
    """Everything a multiplier can reach, with `field` (if any) at 2: the initial parameters and
    logits, the forward and optimizer multipliers, and the first Adam update."""
    model, parametrization = _build(name, width, **({field: 2.0} if field else {}))
    params = nnx.split(model)[1].to_pure_dict()
    logits_BxTxV, _ = model.forward(_batch())
    grads = jax.tree.map(jnp.ones_like, params)  # Adam's first step: lr × multiplier × sign
    tx = build_optimizer(ADAM, parametrization, total_steps=10)
    updates, _ = tx.update(grads, tx.init(params), params)
    return {"params": params, "logits": np.asarray(logits_BxTxV),
            "labels": label_tree(model), "updates": updates,
            "logit_multiplier": parametrization.logit_multiplier,
            "attention_scale": parametrization.attention_scale,
            "multipliers": {family: parametrization.optimizer_multipliers(column(family))
                            for family in ("adam", "sgd", "muon", "sphere", "zeroth_order")}}


def _leaves_by_role(outcome: dict, tree: str) -> list[tuple[str, np.ndarray]]:
    return [(role, np.asarray(x)) for role, x in zip(jax.tree.leaves(outcome["labels"]),
                                                     jax.tree.leaves(outcome[tree]), strict=True)]


@pytest.mark.parametrize("field", TUNABLE)
def test_every_multiplier_keeps_mup_equal_to_sp_at_base_bit_for_bit(field):
    sp, mup = _outcome("sp", BASE_WIDTH, field), _outcome("mup", BASE_WIDTH, field)
    for key in ("params", "updates"):
        for a, b in zip(jax.tree.leaves(sp[key]), jax.tree.leaves(mup[key]), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"{field} {key}")
    np.testing.assert_array_equal(sp["logits"], mup["logits"])
    for key in ("logit_multiplier", "attention_scale", "multipliers"):
        assert sp[key] == mup[key], (field, key)


@pytest.mark.parametrize("field", TUNABLE)
def test_each_multiplier_reaches_the_place_it_claims_under_mup(field):
    """At width_mult 2, `field` = 2 doubles exactly its own target and leaves the rest equal."""
    width = 2 * BASE_WIDTH
    one, two = _outcome("mup", width, None), _outcome("mup", width, field)
    for (role, u1), (_, u2) in zip(_leaves_by_role(one, "updates"), _leaves_by_role(two, "updates"),
                                   strict=True):
        factor = 2.0 if LR_MULTS.get(field) == role else 1.0
        np.testing.assert_allclose(u2, factor * u1, rtol=1e-6, err_msg=f"{field}: {role} update")
    for (role, p1), (_, p2) in zip(_leaves_by_role(one, "params"), _leaves_by_role(two, "params"),
                                   strict=True):
        factor = 2.0 if field == "input_init_mult" and role == "input" else 1.0
        np.testing.assert_allclose(p2, factor * p1, rtol=1e-6, err_msg=f"{field}: {role} init")
    expected_logit = 2.0 if field == "output_mult" else 1.0
    assert two["logit_multiplier"] == expected_logit * one["logit_multiplier"]
    assert two["attention_scale"] == (2.0 if field == "attn_mult" else 1.0) * one["attention_scale"]
    if field == "output_mult":  # the same weights, so the logits double
        np.testing.assert_allclose(two["logits"], 2 * one["logits"], rtol=1e-5, atol=1e-6)
    if field == "attn_mult":  # the same weights, sharper attention: the model itself changed
        assert not np.allclose(two["logits"], one["logits"])


def test_tunable_fields_compose_through_hydra_and_bad_values_are_named():
    cfg = to_run_config(compose(["param=sp", "param.output_mult=2", "param.attn_mult=0.5"]))
    assert (cfg.param.output_mult, cfg.param.attn_mult, cfg.param.input_lr_mult) == (2, 0.5, 1)
    tuned = to_run_config(compose(["+tune=vector_lr_mult", "sweep.multiplier=4"]))
    assert tuned.param.vector_lr_mult == 4.0
    assert all(getattr(tuned.param, f) == 1.0 for f in TUNABLE if f != "vector_lr_mult")
    for value in (0, -1.0):
        with pytest.raises(ConfigError, match=r"param\.input_init_mult=.*positive finite"):
            to_run_config(compose([f"param.input_init_mult={value}"]))


def test_proxy_tune_sweeps_lr_against_each_multiplier_at_the_base_width():
    points = sweep_points(["+experiment=proxy_tune", "param=mup"])
    assert len(points) == len(TUNABLE) * 5 * 2  # multipliers × 2^-2..2^2 × 2 seeds
    chosen = {(o for o in p if o.startswith("+tune=")).__next__()[6:] for p in points}
    assert chosen == set(TUNABLE)
    for point in (points[0], points[-1]):
        cfg = to_run_config(compose(point))
        field = next(o for o in point if o.startswith("+tune="))[6:]
        assert getattr(cfg.param, field) == cfg.sweep.multiplier in (0.25, 4.0)
        assert cfg.model.width == cfg.param.base_width
        assert cfg.sweep.vectorize_lr > 1 and cfg.sweep.log2_lr_min is not None


# ------------------------------------------------------------ the 2-D optimum from known results

LOG2_LR_0, LOG2_MULT_0 = -6.3, 0.7  # the known joint optimum at width 64
MULT_SLOPE = -0.5  # octaves of the multiplier's optimum per width doubling


def _loss(log2_lr: float, log2_mult: float, width: int) -> float:
    """A quadratic bowl tilted between LR and multiplier; the multiplier optimum drifts."""
    y0 = LOG2_MULT_0 + MULT_SLOPE * math.log2(width / 64)
    x, y = log2_lr - LOG2_LR_0, log2_mult - y0
    return 2.0 + 0.05 * x**2 + 0.08 * y**2 + 0.03 * x * y


def _sweep(root, widths=(64, 128), field="output_mult") -> None:
    results = [run_result("mup", width, log2_lr, seed, _loss(log2_lr, log2_mult, width),
                          root=root, multipliers={field: 2.0**log2_mult})
               for width in widths for log2_mult in (-2, -1, 0, 1, 2)
               for log2_lr in np.arange(-9, -3.5, 0.5) for seed in (0, 1)]
    write_results(root, results)


@pytest.fixture(scope="module")
def tuned_sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("proxy_tune")
    _sweep(root)
    return root


def test_joint_optimum_and_multiplier_drift_are_recovered(tuned_sweep, tmp_path):
    from scaling.analysis import load_results

    analysis = analyze(load_results(tuned_sweep))
    by_width = {t["family"]["width"]: t for t in analysis["tunes"]}
    assert sorted(by_width) == [64, 128] and {t["field"] for t in by_width.values()} == {
        "output_mult"}
    for width, tune in by_width.items():
        expected_mult = LOG2_MULT_0 + MULT_SLOPE * math.log2(width / 64)
        assert tune["optimum"]["log2_value"] == pytest.approx(expected_mult, abs=1e-6)
        assert tune["optimum"]["log2_lr"] == pytest.approx(LOG2_LR_0, abs=1e-6)
        assert tune["optimum"]["loss"] == pytest.approx(2.0, abs=1e-9)
        assert not tune["optimum"]["on_edge"]
    (drift,) = analysis["multiplier_drift"]
    assert drift["slope"] == pytest.approx(MULT_SLOPE, abs=1e-6)
    assert drift["drift_octaves"] == pytest.approx(abs(MULT_SLOPE), abs=1e-6)
    table = format_table(analysis)
    assert "output_mult = 1.62 (log2 +0.70) at log2 lr -6.30" in table
    assert "output_mult w64→w128: drift 0.50 octaves, slope -0.50/width-octave" in table
    written = plot_analysis(analysis, tmp_path)
    assert tmp_path / "multiplier_tunes.png" in written


def test_transfer_carries_every_tuned_multiplier_and_round_trips_through_hydra(tmp_path):
    root = tmp_path / "sweep"
    best = {"output_mult": 0.7, "input_lr_mult": -1.2}  # log2 of each optimum
    results = []
    for field in best:
        for log2_mult in (-2, -1, 0, 1, 2):
            log2 = {f: log2_mult if f == field else 0.0 for f in best}
            for log2_lr in np.arange(-9, -3.5, 0.5):
                loss = 2 + 0.05 * (log2_lr + 6.3) ** 2 + sum(
                    0.08 * (log2[f] - best[f]) ** 2 for f in best)
                results.append(run_result("mup", 64, log2_lr, 0, loss, root=root,
                                          multipliers={field: 2.0**log2_mult}))
    unique = {r["name"]: r for r in results}  # the centre (every multiplier 1) is one run
    write_results(root, unique.values())
    shape, result = plan(root, width=512)
    assert shape["multipliers"] == {f: 1.0 for f in TUNABLE}  # the centre is the proxy
    target = result.config
    assert target.model.width == 512
    assert target.param.output_mult == pytest.approx(2**0.7, rel=1e-6)
    assert target.param.input_lr_mult == pytest.approx(2**-1.2, rel=1e-6)
    assert math.log2(result.lr) == pytest.approx(-6.3, abs=1e-6)
    assert any("param.output_mult = 1.625" in r for r in result.reasons)
    assert any("each tuned with the others held" in r for r in result.reasons)
    overrides = command_overrides(target)
    assert any(o.startswith("param.input_lr_mult=") for o in overrides)
    back = to_run_config(compose(overrides))
    assert back.param == target.param
    assert dataclasses.replace(back, logging=target.logging) == target
