"""MuonH and AdamH (docs/rules.md: HyperP): every matrix keeps its init norm, one sphere per layer of
a stack, a relative step along Muon's or Adam's direction, weight decay only at second order, and
the radius is optimizer state that resumes bit for bit."""

from __future__ import annotations

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import TINY_RUN
from flax import nnx

import optim.role_transforms
from experiments.compose import compose, to_run_config
from optim import MatrixAxes, optimizer_config, scale_to_sphere
from scaling.config import ModelConfig, ParamConfig
from scaling.parametrization import build_model, build_optimizer
from scaling.steps import make_step
from scaling.training.checkpoint import Checkpointer
from scaling.training.loop import train

VOCAB, WIDTH, DEPTH = 64, 32, 3
SPHERE_PATHS = {"hidden": [("blocks", n) for n in ("wq", "wk", "wv", "wo", "w_up", "w_down")],
                "output": [("readout",)]}
CONSTANT = {"schedule": "constant", "warmup_steps": 0}


def _batch(B: int = 4, T: int = 16) -> tuple[jax.Array, jax.Array]:
    tokens_BxT1 = jax.random.randint(jax.random.key(1), (B, T + 1), 0, VOCAB)
    return tokens_BxT1[:, :-1], tokens_BxT1[:, 1:]


def _model(param: str = "mup"):
    cfg = ModelConfig(width=WIDTH, depth=DEPTH, head_dim=8, compute_dtype="float32")
    return build_model(cfg, ParamConfig(param, 16, DEPTH), VOCAB, seed=0)


def _get(tree: dict, path: tuple) -> np.ndarray:
    for key in path:
        tree = tree[key]
    return np.asarray(tree)


def _layer_norms(w: np.ndarray) -> np.ndarray:
    """‖W‖_F of each 2-D matrix: per layer of a stacked (L, A, B) leaf."""
    return np.sqrt(np.sum(np.square(w.astype(np.float64)), axis=(-2, -1)))


def _norms(x: np.ndarray) -> np.ndarray:
    return np.linalg.norm(x, axis=(-2, -1), keepdims=True)


def _train(optim_cfg, steps: int, params=None, param: str = "mup"):
    """(initial params, params after `steps` steps) on one fixed batch."""
    model, parametrization = _model(param)
    graphdef, state = nnx.split(model)
    params = state.to_pure_dict() if params is None else params
    step = make_step(optim_cfg, parametrization, graphdef, total_steps=steps)
    train_state = step.init_state(jax.tree.map(jnp.copy, params), optim_cfg.lr)
    batch = _batch()
    for _ in range(steps):
        train_state, _ = step(train_state, *batch)
    return params, jax.device_get(train_state.params)


@pytest.mark.parametrize("name, roles", [("muonh", ("hidden", "output")),
                                         ("adamh", ("hidden", "output"))])
def test_every_matrix_keeps_its_norm_and_turns(name, roles):
    """100 steps at a large relative step: each layer's ‖W‖_F equals its init norm to 1e-5, and
    the matrix has turned (cosine to its init well below 1), so the step is not a no-op."""
    before, after = _train(optimizer_config(name, lr=0.05, **CONSTANT), steps=100)
    for role in roles:
        for path in SPHERE_PATHS[role]:
            w0, w1 = _get(before, path), _get(after, path)
            np.testing.assert_allclose(_layer_norms(w1), _layer_norms(w0), rtol=1e-5,
                                       err_msg=str(path))
            cosine = np.sum(w0 * w1, axis=(-2, -1)) / (_layer_norms(w0) * _layer_norms(w1))
            assert np.all(cosine < 0.95), (path, cosine)
    # embeddings and vectors are AdamW's: trained, and off any sphere (gains leave 1)
    assert not np.allclose(_get(after, ("embed",)), _get(before, ("embed",)))
    gains = _get(after, ("blocks", "attn_norm"))
    assert np.abs(np.linalg.norm(gains, axis=-1) / np.sqrt(WIDTH) - 1).max() > 1e-3


def test_one_sphere_per_layer_not_per_stack():
    """Layers of one stacked leaf start at norms 1, 3 and 0.5: each keeps its own. A single
    sphere for the whole stack would keep only the stack's norm and let the layers trade."""
    model, _ = _model()
    params = nnx.split(model)[1].to_pure_dict()
    params["blocks"]["w_up"] = params["blocks"]["w_up"] * jnp.array([1.0, 3.0, 0.5])[:, None, None]
    before, after = _train(optimizer_config("muonh", lr=0.1, **CONSTANT), steps=30, params=params)
    w0, w1 = _get(before, ("blocks", "w_up")), _get(after, ("blocks", "w_up"))
    np.testing.assert_allclose(_layer_norms(w1), _layer_norms(w0), rtol=1e-5)
    # and the radius state holds one norm per layer, not one per stack
    model, parametrization = _model()
    tx = build_optimizer(optimizer_config("muonh", **CONSTANT), parametrization, total_steps=10)
    radii = [leaf.shape for path, leaf in jax.tree_util.tree_leaves_with_path(tx.init(params))
             if "radius" in jax.tree_util.keystr(path) and "w_up" in jax.tree_util.keystr(path)]
    assert radii == [(DEPTH, 1, 1)]


def test_first_step_is_the_relative_step_then_retraction():
    """One sphere step on a single matrix, computed by hand in float64:
    W' = W − η·(‖W‖/‖O‖)·O, then W'·‖W‖/‖W'‖."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(2, 8, 16)).astype(np.float32)
    o = rng.normal(size=(2, 8, 16)).astype(np.float32)
    eta = 0.1
    tx = scale_to_sphere(eta, {"w": MatrixAxes((-2,), (-1,))})
    update, _ = tx.update({"w": jnp.asarray(o)}, tx.init({"w": jnp.asarray(w)}),
                          {"w": jnp.asarray(w)})
    w64, o64 = w.astype(np.float64), o.astype(np.float64)
    moved = w64 - eta * _norms(w64) / _norms(o64) * o64
    expected = moved * _norms(w64) / _norms(moved)
    np.testing.assert_allclose(w + np.asarray(update["w"]), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["muonh", "adamh"])
def test_retraction_is_to_the_radius_stored_at_init(name):
    """Weights that have drifted off their sphere (here scaled by 1.25, as bf16 rounding drifts
    them slowly) are retracted to the radius stored at init, not kept at their current norm:
    what stops the drift from accumulating. Through the whole optimizer, for every matrix it
    keeps on a sphere."""
    model, parametrization = _model()
    params = nnx.split(model)[1].to_pure_dict()
    tx = build_optimizer(optimizer_config(name, lr=0.05, **CONSTANT), parametrization,
                         total_steps=10)
    state = tx.init(params)
    drifted = jax.tree.map(lambda x: 1.25 * x, params)
    grads = jax.tree.map(jnp.ones_like, params)
    stepped = jax.jit(lambda g, s, p: optax.apply_updates(p, tx.update(g, s, p)[0]))(
        grads, state, drifted)
    for role, paths in SPHERE_PATHS.items():
        for path in paths:
            np.testing.assert_allclose(_layer_norms(_get(stepped, path)),
                                       _layer_norms(_get(params, path)), rtol=1e-5,
                                       err_msg=f"{role} {path}")


def test_muonh_direction_is_muons():
    """MuonH's first hidden step is the sphere step along the same O as optim=muon's."""
    muon_cfg = optimizer_config("muon", lr=1.0, momentum=0.0, clip_norm=0.0, **CONSTANT)
    muonh_cfg = optimizer_config("muonh", lr=0.05, momentum=0.0, clip_norm=0.0, **CONSTANT)
    model, parametrization = _model()
    graphdef, state = nnx.split(model)
    params = state.to_pure_dict()
    grads = jax.jit(jax.grad(lambda p: _loss(graphdef, p)))(params)
    directions = [build_optimizer(cfg, parametrization, total_steps=10)
                  for cfg in (muon_cfg, muonh_cfg)]
    o, step = (jax.jit(tx.update)(grads, tx.init(params), params)[0] for tx in directions)
    w = _get(params, ("blocks", "w_up")).astype(np.float64)
    o_up = -_get(o, ("blocks", "w_up")).astype(np.float64)  # muon's update is −lr·O
    moved = w - 0.05 * _norms(w) / _norms(o_up) * o_up
    expected = moved * _norms(w) / _norms(moved)
    np.testing.assert_allclose(w + _get(step, ("blocks", "w_up")), expected, rtol=1e-4,
                               atol=1e-6)


def test_muonh_takes_muons_options():
    """Momentum dtype and Newton–Schulz fields reach MuonH's direction as they reach Muon's."""
    model, parametrization = _model()
    params = nnx.split(model)[1].to_pure_dict()
    cfg = optimizer_config("muonh", momentum_dtype="bfloat16", ns_scheme="jordan", ns_steps=3,
                           **CONSTANT)
    state = build_optimizer(cfg, parametrization, total_steps=10).init(params)
    momenta = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state)
               if ".mu" in jax.tree_util.keystr(path) and "w_up" in jax.tree_util.keystr(path)]
    assert [m.dtype for m in momenta] == [jnp.bfloat16]


def _loss(graphdef, params):
    inputs_BxT, targets_BxT = _batch()
    logits_BxTxV = nnx.merge(graphdef, params)(inputs_BxT)
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, targets_BxT).mean()


def test_weight_decay_is_second_order_and_warns_once(monkeypatch):
    """One step with λ = 0.1 against λ = 0: the gap is second order in η (halving η quarters
    it; plain decay's ηλ‖W‖ would only halve) and far below plain decay's size, yet nonzero
    (λ is applied); one warning line however often the optimizer is rebuilt."""
    monkeypatch.setattr(optim.role_transforms, "_warned", set())
    gaps, plain = {}, {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for lr in (0.05, 0.025):
            _, without = _train(optimizer_config("muonh", lr=lr, **CONSTANT), steps=1)
            start, with_decay = _train(
                optimizer_config("muonh", lr=lr, weight_decay=0.1, **CONSTANT), steps=1)
            for path in SPHERE_PATHS["hidden"]:
                gaps[lr, path] = np.linalg.norm(_get(with_decay, path) - _get(without, path))
                plain[lr, path] = lr * 0.1 * np.linalg.norm(_get(start, path))
    messages = [str(w.message) for w in caught if "weight_decay" in str(w.message)]
    assert len(messages) == 1 and "second-order" in messages[0], messages
    for path in SPHERE_PATHS["hidden"]:
        assert 0 < gaps[0.05, path] < 0.2 * plain[0.05, path], path
        assert 3.5 < gaps[0.05, path] / gaps[0.025, path] < 4.5, path


def test_zero_readout_has_no_sphere():
    cfg = ModelConfig(width=WIDTH, depth=2, head_dim=8, readout_init="zero")
    _, parametrization = build_model(cfg, ParamConfig("mup", 16, 2), VOCAB, seed=0)
    with pytest.raises(ValueError, match=r"model.readout_init=zero: expected a normal init "
                                         r"with optim=adamh"):
        build_optimizer(optimizer_config("adamh"), parametrization, total_steps=10)


def test_muonh_resume_is_bit_exact_with_its_radius(tmp_path, monkeypatch):
    """The radius is optimizer state: a MuonH run crashed after a checkpoint and resumed ends
    with the same parameters and optimizer state (radius included) as an uninterrupted one."""
    import scaling.training.data

    def config(out):
        return to_run_config(compose([*TINY_RUN, "optim=muonh", f"train.out_dir={out}"]))

    whole = train(config(tmp_path / "whole"))
    original, crashed = scaling.training.data.train_batch, []

    def train_batch(tokens, seed, step, batch_size, seq_len, **rows):
        if step == 10 and not crashed:
            crashed.append(step)
            raise RuntimeError("simulated crash")
        return original(tokens, seed, step, batch_size, seq_len, **rows)

    monkeypatch.setattr(scaling.training.data, "train_batch", train_batch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config(tmp_path / "resumed"))
    resumed = train(config(tmp_path / "resumed"))
    assert (resumed["train_loss"], resumed["val_loss"]) == (whole["train_loss"],
                                                           whole["val_loss"])
    states = []
    for run in (whole, resumed):
        checkpointer = Checkpointer(tmp_path / run["run_dir"] / "checkpoints")
        try:
            states.append(checkpointer.restore_latest(None)[1])
        finally:
            checkpointer.close()
    chex.assert_trees_all_equal(*states)
    radius = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(states[0]["opt_state"])
              if "radius" in jax.tree_util.keystr(path)]
    assert radius, "no radius in the checkpointed optimizer state"
