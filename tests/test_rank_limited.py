"""The rank of Muon's direction and what MuonH divides by: the rank fraction ‖O‖_F²/min(fan_in,
fan_out) is exact on hand-built low-rank factors, the train step logs it per matrix without
touching training, and MuonH's full_rank normalization equals the default on a full-rank
orthogonal direction and takes the longer step the lower its rank."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.compose import compose, to_run_config
from optim import MatrixAxes, optimizer_config, scale_to_sphere
from optim.muon import UPDATE_SCALES, rank_fraction
from optim.sphere import full_rank_norm
from scaling.config import ConfigError, ModelConfig, ParamConfig
from scaling.parametrization import build_model
from scaling.steps.backprop import Measure, init_train_state, make_train_step, optimizer_at

AXES = MatrixAxes((-2,), (-1,))


def _factor(rng, m: int, n: int, rank: int) -> np.ndarray:
    """U_r V_rᵀ: an orthogonal factor of rank r (every nonzero singular value 1)."""
    u = np.linalg.qr(rng.standard_normal((m, rank)))[0]
    v = np.linalg.qr(rng.standard_normal((n, rank)))[0]
    return (u @ v.T).astype(np.float32)


def test_rank_fraction_is_exact_on_low_rank_factors():
    """Rank 3, 8 and 12 of 12 × 20 matrices, stacked as layers: r/12 each (to float32)."""
    rng = np.random.default_rng(0)
    o = np.stack([_factor(rng, 12, 20, r) for r in (3, 8, 12)])
    np.testing.assert_allclose(np.asarray(rank_fraction(jnp.asarray(o), AXES)),
                               [3 / 12, 8 / 12, 1.0], rtol=1e-5)
    # fan-in on the long side: min(fan_in, fan_out) is the short side either way
    np.testing.assert_allclose(float(rank_fraction(jnp.asarray(o[0].T), AXES)), 3 / 12, rtol=1e-5)


def _sphere_step(o: np.ndarray, w: np.ndarray, direction_norm=None) -> np.ndarray:
    tx = scale_to_sphere(0.1, {"w": AXES}, direction_norm=direction_norm)
    params = {"w": jnp.asarray(w)}
    update, _ = tx.update({"w": jnp.asarray(o)}, tx.init(params), params)
    return np.asarray(update["w"])


@pytest.mark.parametrize("update_scale", ["keller", "spectral", "moonlight"])
def test_full_rank_norm_equals_the_frobenius_step_on_a_full_rank_direction(update_scale):
    """O = s·(orthogonal factor of full rank): ‖O‖_F = s·√min exactly, so the two agree."""
    rng = np.random.default_rng(1)
    scale = UPDATE_SCALES[update_scale](20, 12)
    o = scale * _factor(rng, 12, 20, 12)
    w = rng.standard_normal((12, 20)).astype(np.float32)
    np.testing.assert_allclose(_sphere_step(o, w, full_rank_norm(UPDATE_SCALES[update_scale])),
                               _sphere_step(o, w), rtol=1e-5, atol=1e-7)


def test_full_rank_norm_divides_a_low_rank_direction_by_the_full_rank_norm():
    """Rank 3 of 12: W' = W − η·(‖W‖/√12)·O, not ‖W‖/‖O‖ = ‖W‖/√3, then the retraction; by
    hand in float64."""
    rng = np.random.default_rng(2)
    o = _factor(rng, 12, 20, 3)
    w = rng.standard_normal((12, 20)).astype(np.float32)
    w64, o64, eta = w.astype(np.float64), o.astype(np.float64), 0.1
    moved = w64 - eta * np.linalg.norm(w64) / np.sqrt(12) * o64
    expected = moved * np.linalg.norm(w64) / np.linalg.norm(moved)
    np.testing.assert_allclose(w + _sphere_step(o, w, full_rank_norm()), expected, rtol=1e-5,
                               atol=1e-6)
    frobenius = w64 - eta * np.linalg.norm(w64) / np.sqrt(3) * o64
    assert not np.allclose(w + _sphere_step(o, w), expected, atol=1e-3)
    np.testing.assert_allclose(w + _sphere_step(o, w), frobenius * np.linalg.norm(w64)
                               / np.linalg.norm(frobenius), rtol=1e-5, atol=1e-6)


def test_muonh_full_rank_composes_and_other_values_are_refused():
    cfg = to_run_config(compose(["param=hyperp", "optim.sphere_norm=full_rank"]))
    assert cfg.optim.sphere_norm == "full_rank"
    assert cfg.optim.sphere_direction_norm() is not None
    assert optimizer_config("muonh").sphere_direction_norm() is None
    with pytest.raises(ConfigError) as error:
        to_run_config(compose(["param=hyperp", "optim.sphere_norm=spectral"]))
    assert error.value.field == "optim.sphere_norm"


def test_the_train_step_logs_each_matrixs_rank_fraction_and_trains_bit_for_bit():
    """optim=muon: one 'orth_rank/blocks/<name>/<layer>' per hidden matrix and layer, each in
    (0, 1]; layer 0's projections see at most the batch's few distinct tokens, so their
    gradients' rank fraction is below the MLP's; the measured step equals the unmeasured one."""
    model, parametrization = build_model(
        ModelConfig(kind="transformer", width=64, depth=2, head_dim=16, context=16),
        ParamConfig("mup", 64, 2), 64, seed=0)
    graphdef, params = nnx.split(model)
    params = params.to_pure_dict()
    cfg = optimizer_config("muon", lr=0.02, warmup_steps=0)
    tx = optimizer_at(cfg, parametrization, total_steps=10)
    tokens_BxT1 = (jnp.arange(2 * 17) % 5).reshape(2, 17)  # 5 distinct tokens
    batch = (tokens_BxT1[:, :-1], tokens_BxT1[:, 1:])
    measure = Measure.of(cfg, parametrization)
    copy = lambda: jax.tree.map(jnp.copy, params)
    state, measured = make_train_step(graphdef, tx, measure)(
        init_train_state(copy(), tx, cfg.lr), *batch)
    plain, _ = make_train_step(graphdef, tx, dataclasses.replace(measure, orthogonal=None))(
        init_train_state(copy(), tx, cfg.lr), *batch)
    chex.assert_trees_all_equal(state, plain)
    ranks = {k: float(v) for k, v in jax.device_get(measured).items() if k.startswith("orth_")}
    names = ("wq", "wk", "wv", "wo", "w_up", "w_down")
    assert set(ranks) == {f"orth_rank/blocks/{n}/{layer}" for n in names for layer in (0, 1)}
    assert all(0 < r <= 1.01 for r in ranks.values()), ranks
    # the value projection at layer 0 sees 5 distinct inputs: rank ≤ 5 of 64
    assert ranks["orth_rank/blocks/wv/0"] <= 5 / 64 + 1e-3
    assert Measure.of(optimizer_config("adamw"), parametrization).orthogonal is None


def test_the_rank_table_averages_a_runs_indicators_by_width(tmp_path):
    """benchmarks/rank_limits.py: layer-0 rank fractions, the rest's mean, ‖O‖² of wq/0 and
    attention Z, averaged over the steps from --from-step on, one row per width."""
    import json
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from rank_limits import table

    for width, fraction in ((64, 0.5), (128, 0.25)):
        run = tmp_path / "sweep" / f"w{width}"
        run.mkdir(parents=True)
        (run / "result.json").write_text(json.dumps(
            {"config": {"model": {"width": width}, "optim": {"lr": 0.1}}}))
        lines = [{"step": step, "attn_z/0": z, "orth_rank/blocks/wq/0": fraction,
                  "orth_rank/blocks/wq/1": 0.9}
                 for step, z in ((10, 100.0), (50, 2.0), (100, 4.0))]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    rows = table([tmp_path / "sweep"], from_step=50).splitlines()[1:]
    assert [r.split()[:3] for r in rows] == [["sweep", "64", "0.500"], ["sweep", "128", "0.250"]]
    assert [r.split()[-3:] for r in rows] == [["0.900", "32.0", "3.00"],
                                               ["0.900", "32.0", "3.00"]]
