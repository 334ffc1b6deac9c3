"""μP vs SP (docs/rules.md: μP): bit-for-bit equal at the base shape; at width_mult 4 the init
stds, logit multiplier and optimizer multipliers follow the table, and the optimizer applies them."""

from __future__ import annotations

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from families import column
from flax import nnx

from models import label_tree
from optim import AdamWConfig, RoleMultipliers, SGDConfig, optimizer_config, role_of
from scaling.config import ModelConfig, ParamConfig
from scaling.parametrization import build_model, build_optimizer
from scaling.steps import make_step
from scaling.steps.loss import next_token_loss

VOCAB = 256
BASE_WIDTH, WIDTH, HEAD_DIM, DEPTH = 32, 128, 16, 2
M = WIDTH / BASE_WIDTH  # 4
EMBED_STD = 0.5


def _batch(B: int = 4, T: int = 16) -> tuple[jax.Array, jax.Array]:
    tokens_BxT1 = (jnp.arange(B * (T + 1)) * 7 % VOCAB).reshape(B, T + 1)
    return tokens_BxT1[:, :-1], tokens_BxT1[:, 1:]


def _build(kind: str, name: str, width: int, depth: int = DEPTH):
    cfg = ModelConfig(kind=kind, width=width, depth=depth, head_dim=HEAD_DIM, context=4,
                      embed_std=EMBED_STD)
    return build_model(cfg, ParamConfig(name, BASE_WIDTH, DEPTH), VOCAB, seed=0)


def _params(model) -> dict:
    return nnx.split(model)[1].to_pure_dict()


def _train(kind: str, name: str, optim_cfg, steps: int) -> dict:
    model, parametrization = _build(kind, name, BASE_WIDTH)
    graphdef, params = nnx.split(model)
    train_step = make_step(optim_cfg, parametrization, graphdef, total_steps=steps)
    state = train_step.init_state(params.to_pure_dict(), optim_cfg.lr)
    inputs_BxT, targets_BxT = _batch()
    for _ in range(steps):
        state, _ = train_step(state, inputs_BxT, targets_BxT)
    return jax.device_get(state.params)


# ---------------------------------------------------------------- (a) μP == SP at the base shape


@pytest.mark.parametrize("kind", ["transformer", "mlp"])
@pytest.mark.parametrize("depth", [DEPTH, DEPTH + 1])
def test_mup_equals_sp_at_base_width_init(kind, depth):
    """At width == base_width (any depth) μP and SP build bit-identical initial parameters."""
    mup, mup_par = _build(kind, "mup", BASE_WIDTH, depth)
    sp, sp_par = _build(kind, "sp", BASE_WIDTH, depth)
    chex.assert_trees_all_equal(_params(mup), _params(sp))
    assert mup_par.logit_multiplier == sp_par.logit_multiplier == 1.0
    assert mup_par.attention_scale == sp_par.attention_scale
    for family in ("adam", "sgd"):
        assert mup_par.optimizer_multipliers(column(family)) == sp_par.optimizer_multipliers(column(family))


@pytest.mark.parametrize("optim_cfg", [
    AdamWConfig(lr=1e-2, weight_decay=0.1, warmup_steps=1),
    SGDConfig(lr=0.1, momentum=0.9, weight_decay=0.1, warmup_steps=1),
], ids=["adamw", "sgd"])
def test_mup_equals_sp_at_base_width_after_steps(optim_cfg):
    """At the base shape μP and SP give bit-identical parameters after 3 optimizer steps."""
    mup = _train("transformer", "mup", optim_cfg, steps=3)
    sp = _train("transformer", "sp", optim_cfg, steps=3)
    init = _params(_build("transformer", "sp", BASE_WIDTH)[0])
    assert not np.array_equal(sp["readout"], init["readout"])  # training moved the weights
    for a, b in zip(jax.tree.leaves(mup), jax.tree.leaves(sp)):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- (b) width_mult 4


def _expected_std(name: str, role: str, fan_in: int) -> float:
    if role == "input":
        return EMBED_STD
    if role == "hidden":
        return 1 / math.sqrt(fan_in)
    assert role == "output"
    return 1 / math.sqrt(BASE_WIDTH if name == "mup" else fan_in)


@pytest.mark.parametrize("kind", ["transformer", "mlp"])
@pytest.mark.parametrize("name", ["mup", "sp"])
def test_init_std_per_role_at_width_mult_4(kind, name):
    """init_std and the measured std of each normal-init param match the μP table; gains/biases are 1/0."""
    model, parametrization = _build(kind, name, WIDTH)
    params = _params(model)
    for path, spec in parametrization.specs.items():
        value = np.asarray(params[path[0]] if len(path) == 1 else params[path[0]][path[1]])
        if spec.init != "normal":
            assert spec.role == "vector", path
            np.testing.assert_array_equal(value, 1.0 if spec.init == "one" else 0.0)
            continue
        expected = _expected_std(name, spec.role, spec.fan_in)
        assert parametrization.init_std(path) == pytest.approx(expected, rel=1e-12), path
        assert value.std() == pytest.approx(expected, rel=0.03), path
        assert abs(value.mean()) < 0.03 * expected, path


@pytest.mark.parametrize("name, expected", [("mup", 1 / M), ("sp", 1.0)])
def test_logit_multiplier_at_width_mult_4(name, expected):
    """μP multiplies the logits by 1/m = 1/4; SP by 1; both keep 1/sqrt(head_dim) attention."""
    model, parametrization = _build("transformer", name, WIDTH)
    assert parametrization.logit_multiplier == expected
    assert model.logit_multiplier == expected
    assert parametrization.attention_scale == pytest.approx(HEAD_DIM**-0.5)


def _mults(lr, eps, wd) -> RoleMultipliers:
    return RoleMultipliers(lr=lr, eps=eps, weight_decay=wd)


# Hand-computed from docs/rules.md: μP at m = 4 (every fan that grows grows by 4).
EXPECTED_MULTIPLIERS = {
    ("mup", "adam"): {"input": _mults(1, 1, 1), "hidden": _mults(1 / 4, 1 / 4, 4),
                      "output": _mults(1, 1, 1), "vector": _mults(1, 1, 0)},
    ("mup", "sgd"): {"input": _mults(4, 1, 1), "hidden": _mults(1, 1, 1),
                     "output": _mults(4, 1, 1), "vector": _mults(4, 1, 1 / 4)},
    ("sp", "adam"): {"input": _mults(1, 1, 1), "hidden": _mults(1, 1, 1),
                     "output": _mults(1, 1, 1), "vector": _mults(1, 1, 0)},
    ("sp", "sgd"): {"input": _mults(1, 1, 1), "hidden": _mults(1, 1, 1),
                    "output": _mults(1, 1, 1), "vector": _mults(1, 1, 1)},
}


@pytest.mark.parametrize("kind", ["transformer", "mlp"])
@pytest.mark.parametrize("name, family", list(EXPECTED_MULTIPLIERS))
def test_optimizer_multipliers_at_width_mult_4(kind, name, family):
    """Parametrization.optimizer_multipliers matches the hand-computed μP table per role."""
    _, parametrization = _build(kind, name, WIDTH)
    by_label = parametrization.optimizer_multipliers(column(family))
    got = {role_of(label): mult for label, mult in by_label.items()}
    for label, mult in by_label.items():  # without a depth rule, block parameters are no apart
        assert mult == got[role_of(label)], label
    expected = EXPECTED_MULTIPLIERS[(name, family)]
    assert set(got) == set(expected)
    for role, mult in expected.items():
        for field in ("lr", "eps", "weight_decay"):
            assert getattr(got[role], field) == pytest.approx(getattr(mult, field), rel=1e-12), (
                role, field)


@functools.cache
def _width_mult_4(name: str):
    """(labels, parametrization, params, grads on _batch()) of the Transformer at width_mult 4,
    built and differentiated once per parametrization for the update tests (which only read)."""
    model, parametrization = _build("transformer", name, WIDTH)
    graphdef, params = nnx.split(model)
    params = params.to_pure_dict()
    grads = jax.jit(jax.grad(lambda p: next_token_loss(graphdef, p, *_batch())))(params)
    return label_tree(model), parametrization, params, grads


def _first_update(name: str, cfg, zero_grads: bool = False):
    """(labels, params, grads, updates) of the first optimizer update at width_mult 4."""
    labels, parametrization, params, grads = _width_mult_4(name)
    if zero_grads:
        grads = jax.tree.map(jnp.zeros_like, params)
    tx = build_optimizer(cfg, parametrization, total_steps=10)
    updates, _ = tx.update(grads, tx.init(params), params)
    return labels, params, grads, updates


CONSTANT = {"schedule": "constant", "warmup_steps": 0, "clip_norm": 0.0}


@pytest.mark.parametrize("name, hidden_lr_mult", [("mup", 1 / M), ("sp", 1.0)])
def test_first_adam_update_size_per_role(name, hidden_lr_mult):
    """Adam's first step moves each entry by lr * role multiplier: lr/4 for μP hidden, else lr."""
    lr = 1e-3
    labels, _, grads, updates = _first_update(name, AdamWConfig(lr=lr, **CONSTANT))
    for role, g, u in zip(jax.tree.leaves(labels), jax.tree.leaves(grads),
                          jax.tree.leaves(updates)):
        expected = lr * (hidden_lr_mult if role == "hidden" else 1.0)
        moved = np.abs(np.asarray(g)) > 1e-5  # where ε = 1e-8 is negligible
        assert moved.mean() > 0.01, role
        np.testing.assert_allclose(np.abs(np.asarray(u))[moved], expected, rtol=1e-2,
                                   err_msg=role)


@pytest.mark.parametrize("name", ["mup", "sp"])
def test_first_adam_update_applies_eps_multiplier(name):
    """With ε comparable to the gradients, u = -lr·k_lr·g/(|g| + ε·k_eps) entry by entry."""
    lr, eps = 1e-3, 1e-4
    labels, _, grads, updates = _first_update(name, AdamWConfig(lr=lr, eps=eps, **CONSTANT))
    mults = EXPECTED_MULTIPLIERS[(name, "adam")]
    for role, g, u in zip(jax.tree.leaves(labels), jax.tree.leaves(grads),
                          jax.tree.leaves(updates)):
        g = np.asarray(g, np.float64)
        expected = -lr * mults[role].lr * g / (np.abs(g) + eps * mults[role].eps)
        np.testing.assert_allclose(u, expected, rtol=1e-4, atol=1e-10, err_msg=role)


# Decay per step (p -> p - c·lr·λ·p) at m = 4: MuAdamW keeps lr·λ width-invariant for hidden.
EXPECTED_DECAY = {
    ("mup", "adamw"): {"input": 1, "hidden": 1, "output": 1, "vector": 0},
    ("sp", "adamw"): {"input": 1, "hidden": 1, "output": 1, "vector": 0},
    ("mup", "sgd"): {"input": 4, "hidden": 1, "output": 4, "vector": 1},
    ("sp", "sgd"): {"input": 1, "hidden": 1, "output": 1, "vector": 1},
}


@pytest.mark.parametrize("name, optim_name", list(EXPECTED_DECAY))
def test_weight_decay_multipliers_applied(name, optim_name):
    """With zero gradients the update is pure LR-coupled decay, -lr·λ·(lr mult·wd mult)·p."""
    lr, wd = 1e-2, 0.1
    momentum = {"momentum": 0.0} if optim_name == "sgd" else {}
    cfg = optimizer_config(optim_name, lr=lr, weight_decay=wd, **momentum, **CONSTANT)
    labels, params, _, updates = _first_update(name, cfg, zero_grads=True)
    for role, p, u in zip(jax.tree.leaves(labels), jax.tree.leaves(params),
                          jax.tree.leaves(updates)):
        expected = -lr * wd * EXPECTED_DECAY[(name, optim_name)][role] * np.asarray(p)
        np.testing.assert_allclose(u, expected, rtol=1e-5, atol=1e-12, err_msg=role)
