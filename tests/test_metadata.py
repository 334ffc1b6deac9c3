"""Scaling metadata: every parameter has a role and full metadata, the label tree covers the
parameter tree, stacked layers keep per-layer fans, and the optimizer partition covers every leaf."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import optim
from models import label_tree
from models.tagged import INITS, ROLES, iter_params, param_specs
from optim import AdamWConfig, optimizer_config
from scaling.config import ModelConfig, ParamConfig
from scaling.parametrization import build_model, build_optimizer

KINDS = ("transformer", "mlp")
VOCAB = 256
WIDTH, BASE_WIDTH, DEPTH, BASE_DEPTH = 64, 32, 3, 2  # depth != base depth on purpose
NORM_GAINS = {("blocks", "attn_norm"), ("blocks", "mlp_norm"), ("final_norm",)}


def _cfg(kind: str, width: int = WIDTH, depth: int = DEPTH) -> ModelConfig:
    return ModelConfig(kind=kind, width=width, depth=depth, head_dim=16, context=4)


@pytest.fixture(scope="module", params=KINDS)
def built(request):
    """(kind, model, parametrization) under μP at width 64, base width 32, depth 3, base depth 2."""
    model, parametrization = build_model(_cfg(request.param),
                                         ParamConfig("mup", BASE_WIDTH, BASE_DEPTH), VOCAB, seed=0)
    return request.param, model, parametrization


def _params(model) -> dict:
    return nnx.split(model)[1].to_pure_dict()


def test_every_param_has_role_and_full_metadata(built):
    """Each Param carries a known role and complete, consistent scaling metadata."""
    _, model, _ = built
    params = list(iter_params(model))
    assert params
    for path, p in params:
        meta, ndim = p.get_metadata(), len(p.shape)
        where = "/".join(map(str, path))
        assert meta["role"] in ROLES, where
        assert meta["init"] in INITS, where
        assert isinstance(meta["residual"], bool), where
        assert float(meta["init_scale"]) > 0, where
        assert len(meta["logical_axes"]) == ndim, where
        for axes in (meta["fan_in_axes"], meta["fan_out_axes"]):
            assert all(-ndim <= a < 0 for a in axes), (where, axes)
        assert not set(meta["fan_in_axes"]) & set(meta["fan_out_axes"]), where


def test_label_tree_matches_param_tree(built):
    """label_tree has exactly the structure of the parameter tree, with a role at every leaf."""
    _, model, _ = built
    labels, params = label_tree(model), _params(model)
    assert jax.tree.structure(labels) == jax.tree.structure(params)
    assert set(jax.tree.leaves(labels)) <= set(ROLES)


def test_named_params_have_expected_roles(built):
    """Embeddings are 'input', the readout 'output', gains and biases 'vector', matrices 'hidden'."""
    kind, _, parametrization = built
    roles = {path: spec.role for path, spec in parametrization.specs.items()}
    assert roles[("embed",)] == "input"
    assert roles[("readout",)] == "output"
    if kind == "transformer":
        for path in NORM_GAINS:
            assert roles[path] == "vector", path
        for name in ("wq", "wk", "wv", "wo", "w_up", "w_down"):
            assert roles[("blocks", name)] == "hidden", name
    else:
        assert roles[("embed_bias",)] == "vector"
        assert roles[("layers", "b")] == "vector"
        assert roles[("layers", "w")] == "hidden"


def test_stacked_params_keep_per_layer_fans(built):
    """Stacked leaves have a leading 'layers' axis outside their fan axes: fans ignore depth."""
    kind, _, parametrization = built
    stacked = {p: s for p, s in parametrization.specs.items() if s.logical_axes[0] == "layers"}
    assert stacked
    for path, spec in stacked.items():
        assert spec.shape[0] == DEPTH, path
        assert -len(spec.shape) not in spec.fan_in_axes + spec.fan_out_axes, path
    D = WIDTH
    expected_fans = ({("blocks", "wq"): (D, D), ("blocks", "wo"): (D, D),
                      ("blocks", "w_up"): (D, 4 * D), ("blocks", "w_down"): (4 * D, D),
                      ("blocks", "attn_norm"): (1, D)}
                     if kind == "transformer" else {("layers", "w"): (D, D), ("layers", "b"): (1, D)})
    for path, (fan_in, fan_out) in expected_fans.items():
        spec = parametrization.specs[path]
        assert (spec.fan_in, spec.fan_out) == (fan_in, fan_out), path


def test_fans_independent_of_depth(built):
    """The same width at depth 1 and depth 3 gives identical fans for every parameter."""
    kind, _, parametrization = built
    shallow = param_specs(nnx.eval_shape(
        lambda: build_model(_cfg(kind, depth=1), ParamConfig("mup", BASE_WIDTH, BASE_DEPTH),
                            VOCAB, seed=0)[0]))
    assert set(shallow) == set(parametrization.specs)
    for path, spec in parametrization.specs.items():
        assert (shallow[path].fan_in, shallow[path].fan_out) == (spec.fan_in, spec.fan_out), path


def test_fan_mults_are_one_at_base_width_and_other_depth():
    """At width == base_width, every fan multiplier is 1 even though depth != base depth."""
    for kind in KINDS:
        _, parametrization = build_model(_cfg(kind, width=BASE_WIDTH),
                                         ParamConfig("mup", BASE_WIDTH, BASE_DEPTH), VOCAB, 0)
        for path in parametrization.specs:
            assert parametrization.fan_mults(path) == (1.0, 1.0), (kind, path)


@pytest.mark.parametrize("optim_name", ["adamw", "sgd"])
def test_optimizer_partition_routes_every_leaf(built, optim_name):
    """build_optimizer covers every leaf, and each leaf gets its own role's learning rate.

    With a constant schedule, no clipping and zero momentum, SGD's update is -lr * mult * grad;
    for Adam the first update of a unit gradient is -lr * mult (ε is negligible).
    """
    _, model, parametrization = built
    lr = 1e-2
    momentum = {"momentum": 0.0} if optim_name == "sgd" else {}
    cfg = optimizer_config(optim_name, lr=lr, schedule="constant", warmup_steps=0, clip_norm=0.0,
                           **momentum)
    labels, params = parametrization.labels(), _params(model)
    tx = build_optimizer(cfg, parametrization, total_steps=10)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    chex.assert_trees_all_equal_structs(updates, params)
    mults = parametrization.optimizer_multipliers(cfg)
    assert set(mults) == set(jax.tree.leaves(labels))
    for role, update in zip(jax.tree.leaves(labels), jax.tree.leaves(updates)):
        np.testing.assert_allclose(update, -lr * mults[role].lr, rtol=1e-6, err_msg=role)


def test_optimizer_rejects_unknown_role(built):
    """A leaf whose role has no optimizer transform raises instead of going untrained."""
    _, _, parametrization = built
    labels = parametrization.labels()
    labels["readout"] = "not-a-role"
    with pytest.raises(ValueError, match="no entry for the roles"):
        optim.build_optimizer(AdamWConfig(), labels,
                              parametrization.optimizer_multipliers(AdamWConfig()),
                              total_steps=100)
