"""A matrix optimizer's Adam-trained groups at their own LR (optim.adam_lr): the groups step at
exactly that LR whatever the matrix LR, the field composes, validates and names its runs, a
transfer moves it with the base LR, and a sweep of matrix LR × Adam LR gives back a planted
2-D optimum and each coordinate's drift with width."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from synthetic import run_result, write_results

from experiments.compose import compose, to_run_config
from experiments.transfer import plan
from models import label_tree
from optim import optimizer_config
from scaling.analysis import analyze, format_table, load_results
from scaling.config import ConfigError, ModelConfig, ParamConfig
from scaling.parametrization import build_model, build_optimizer
from scaling.training.rundir import run_name
from scaling.transfer import transfer

CONSTANT = {"schedule": "constant", "warmup_steps": 0, "clip_norm": 0.0}


def _first_updates(name: str, **fields) -> dict[str, np.ndarray]:
    """Each leaf's first update (as label/path) under `name` with `fields`, all-ones gradients."""
    model, parametrization = build_model(
        ModelConfig(kind="transformer", width=32, depth=1, head_dim=16, context=8),
        ParamConfig("mup", 32, 1), 64, seed=0)
    params = nnx.state(model, nnx.Param).to_pure_dict()
    tx = build_optimizer(optimizer_config(name, **CONSTANT, **fields), parametrization,
                         total_steps=10)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    labels = jax.tree.leaves(label_tree(model))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    return {f"{label}{path}": np.asarray(u)
            for label, path, u in zip(labels, paths, jax.tree.leaves(updates), strict=True)}


@pytest.mark.parametrize("name", ["muon", "muonh"])
def test_the_adam_groups_step_at_adam_lr_whatever_the_matrix_lr(name):
    """Adam's first step is −lr·sign(g) per entry: with optim.adam_lr the embeddings and
    vectors step by exactly adam_lr at matrix LRs 0.02 and 0.05, and the hidden matrices move
    with the matrix LR; without it they step by lr · adam_lr_ratio."""
    slow = _first_updates(name, lr=0.02, adam_lr=0.003)
    fast = _first_updates(name, lr=0.05, adam_lr=0.003)
    tied = _first_updates(name, lr=0.05, adam_lr_ratio=0.5)
    adam_keys = [k for k in slow if k.startswith(("input", "vector"))]
    hidden = [k for k in slow if k.startswith("hidden")]
    assert adam_keys and hidden
    for key in adam_keys:
        np.testing.assert_allclose(slow[key], -0.003, rtol=1e-5, err_msg=key)
        np.testing.assert_array_equal(slow[key], fast[key])
        np.testing.assert_allclose(tied[key], -0.025, rtol=1e-5, err_msg=key)
    for key in hidden:
        assert np.linalg.norm(fast[key]) > 2 * np.linalg.norm(slow[key])


def test_adam_lr_composes_names_its_runs_and_is_validated():
    default = to_run_config(compose(["optim=muonh", "param=hyperp"]))
    fixed = to_run_config(compose(["optim=muonh", "param=hyperp", "optim.adam_lr=0.01"]))
    assert default.optim.adam_lr is None and fixed.optim.adam_lr == 0.01
    assert run_name(default) != run_name(fixed)
    with pytest.raises(ConfigError) as error:
        to_run_config(compose(["optim=muon", "optim.adam_lr=-1"]))
    assert error.value.field == "optim.adam_lr" and error.value.value == -1


def test_a_run_from_before_a_field_existed_shares_its_shape():
    """A result written before optim.adam_lr and optim.sphere_norm existed (the fields absent)
    is one shape with a run that spells their defaults out."""
    old = run_result("hyperp", 64, -4, 0, 2.3, extra={"optim": {"name": "muonh"}})
    new = run_result("hyperp", 64, -4, 1, 2.3, extra={"optim": {"name": "muonh"}})
    for field in ("adam_lr", "sphere_norm"):
        del old["config"]["optim"][field]
    assert new["config"]["optim"]["sphere_norm"] == "frobenius"
    (shape,) = analyze([old, new])["shapes"]
    assert shape["seeds"] == [0, 1] and shape["setting"] == {}


def test_a_transfer_moves_adam_lr_by_the_base_lrs_factor():
    proxy = to_run_config(compose(["optim=muon", "optim.adam_lr=0.01", "train.steps=100"]))
    result = transfer(proxy, 0.02, steps=800)  # tokens ×8: η × 8^−0.32
    factor = 8**-0.32
    assert result.lr == pytest.approx(0.02 * factor, rel=1e-12)
    assert result.config.optim.adam_lr == pytest.approx(0.01 * factor, rel=1e-12)


# The planted surface: loss = 2 + a·(log2 lr − l*)² + b·(log2 adam_lr − A*)², with each width's
# optimum moving at its own slope, so the analysis must find each coordinate apart.
LR_0, LR_SLOPE, ADAM_0, ADAM_SLOPE = -3.3, -0.25, -4.6, 0.5


def _planted(width: int) -> tuple[float, float]:
    doublings = math.log2(width / 64)
    return LR_0 + LR_SLOPE * doublings, ADAM_0 + ADAM_SLOPE * doublings


@pytest.fixture(scope="module")
def adam_sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("adam2d")
    results = []
    for width in (64, 128):
        lr_star, adam_star = _planted(width)
        for log2_adam in (-7, -6, -5, -4, -3):
            for log2_lr in np.arange(-6, -0.5, 0.5):
                for seed in (0, 1):
                    loss = (2 + 0.04 * (log2_lr - lr_star) ** 2
                            + 0.03 * (log2_adam - adam_star) ** 2 + 1e-3 * seed)
                    results.append(run_result(
                        "hyperp", width, log2_lr, seed, loss, root=root,
                        extra={"optim": {"name": "muonh", "adam_lr": 2.0**log2_adam}}))
    write_results(root, results)
    return root


def test_the_2d_analysis_finds_each_planted_optimum_and_its_drift(adam_sweep):
    analysis = analyze(load_results(adam_sweep))
    tunes = {t["family"]["width"]: t for t in analysis["tunes"]}
    assert sorted(tunes) == [64, 128] and {t["field"] for t in tunes.values()} == {"adam_lr"}
    for width, tune in tunes.items():
        lr_star, adam_star = _planted(width)
        assert tune["optimum"]["log2_value"] == pytest.approx(adam_star, abs=1e-6)
        assert tune["optimum"]["log2_lr"] == pytest.approx(lr_star, abs=1e-6)
    (drift,) = analysis["multiplier_drift"]
    assert drift["slope"] == pytest.approx(ADAM_SLOPE, abs=1e-6)
    assert drift["lr_slope"] == pytest.approx(LR_SLOPE, abs=1e-6)
    table = format_table(analysis)
    assert "adam_lr w64→w128: drift 0.50 octaves, slope +0.50/width-octave" in table
    assert "the joint optimum's LR: drift 0.25, slope -0.25" in table
    # each Adam LR is a width family of its own, named in the drift lines
    assert "hyperp muonh adam_lr=0.03125 d2" in table


def test_transfer_takes_the_tuned_adam_lr_and_the_joint_optimums_lr(adam_sweep):
    shape, result = plan(adam_sweep, width=256, steps=800)
    assert shape["width"] == 128
    lr_star, adam_star = _planted(128)
    factor = 8**-0.32 * (128 / 256) ** 0.5  # tokens ×8; HyperP's law: √(d0/d)
    assert math.log2(result.lr) == pytest.approx(lr_star + math.log2(factor), abs=1e-6)
    assert math.log2(result.config.optim.adam_lr) == pytest.approx(
        adam_star + math.log2(factor), abs=1e-6)
    assert any(r.startswith("optim.adam_lr = ") and "moved by the same law" in r
               for r in result.reasons)
