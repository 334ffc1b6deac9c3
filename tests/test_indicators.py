"""Stability indicators: the train step's measurements against a hand computation, and one tiny
run's metrics, spectral.jsonl, result.json and W&B history."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import TINY_RUN
from flax import nnx
from wandb_log import finished_run_records, items, of_type

from experiments.compose import compose, to_run_config
from models.tagged import leaf_at
from models.transformer import ATTENTION_Z_SHARE
from scaling.config import ConfigError, LoggingConfig, validate
from scaling.files import read_jsonl
from scaling.parametrization import build_model, make_parametrization
from scaling.spectral import as_matrices
from scaling.steps.backprop import Measure, init_train_state, make_train_step, optimizer_at
from scaling.steps.loss import next_token_loss
from scaling.training.checkpoint import Checkpointer
from scaling.training.loop import train
from scaling.training.rundir import run_name

VOCAB = 256
RTOL = 1e-4  # float32 in the step against float64 by hand
GROUPS = ("hidden.block", "input", "output", "vector", "vector.block")


@pytest.fixture(scope="module")
def one_step() -> dict:
    """One measured step of the tiny run's program (conftest's TINY_RUN, which the run below and
    other tests compile too) from parameters with one massive embedding feature (so the residual
    stream has outliers) and a doubled readout (so the gradient is clipped); and the same step
    unmeasured."""
    cfg = to_run_config(compose(TINY_RUN))
    model, parametrization = build_model(cfg.model, cfg.param, VOCAB, cfg.train.seed)
    graphdef, params = nnx.split(model)
    params = params.to_pure_dict()
    params["embed"] = params["embed"].at[:, 5].set(30.0)
    params["readout"] = 2 * params["readout"]
    tokens_BxT1 = jax.random.randint(jax.random.key(1), (cfg.train.batch_size,
                                                          cfg.train.seq_len + 1), 0, VOCAB)
    batch = (tokens_BxT1[:, :-1], tokens_BxT1[:, 1:])
    tx = optimizer_at(cfg.optim, parametrization, total_steps=cfg.train.steps)
    measure = Measure(parametrization.labels(), cfg.optim.clip_norm)
    copy = lambda: jax.tree.map(jnp.copy, params)
    state, measured = make_train_step(graphdef, tx, measure)(
        init_train_state(copy(), tx, cfg.optim.lr), *batch)
    plain, _ = make_train_step(graphdef, tx, dataclasses.replace(measure, indicators=False))(
        init_train_state(copy(), tx, cfg.optim.lr), *batch)
    return {"model": model, "params": params, "batch": batch, "graphdef": graphdef,
            "clip_norm": cfg.optim.clip_norm,
            "labels": parametrization.labels(), "state": state, "plain": plain,
            "measured": jax.device_get(measured)}


def _f64(x) -> np.ndarray:
    return np.asarray(x, np.float64)


def _rms_norm(x, gain):
    return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + 1e-6) * _f64(gain)


def _rope(x_BxTxNxH, base):
    H = x_BxTxNxH.shape[-1]
    angle_TxF = np.arange(x_BxTxNxH.shape[1])[:, None] * base ** (-np.arange(0, H, 2) / H)
    cos, sin = np.cos(angle_TxF)[None, :, None], np.sin(angle_TxF)[None, :, None]
    x1, x2 = np.split(x_BxTxNxH, 2, axis=-1)
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _gelu(x):  # jax.nn.gelu's default tanh form
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _outlier_percent(x_BxTxD):
    deviation = np.abs(x_BxTxD - x_BxTxD.mean(-1, keepdims=True))
    return 100 * np.mean(deviation > 5 * x_BxTxD.std(-1, keepdims=True))


def _by_hand(model, params, inputs_BxT) -> dict:
    """The Transformer's forward in float64 numpy, and the indicators of its activations."""
    p, blocks = params, params["blocks"]
    H, scale = model.head_dim, model.attention_scale
    x = _f64(p["embed"])[np.asarray(inputs_BxT)]
    Bn, Tn, D = x.shape
    causal_TxS = np.tril(np.ones((Tn, Tn), bool))
    out = {"embed_out": np.sqrt(np.mean(x**2))}
    for name in ("attn_z", "attn_out", "mlp_out", "block_out", "outliers"):
        out[name] = []
    for layer in range(blocks["wq"].shape[0]):
        w = {name: _f64(value[layer]) for name, value in blocks.items()}
        h = _rms_norm(x, w["attn_norm"])
        q, k = (_rope((h @ w[m]).reshape(Bn, Tn, D // H, H), model.rope_base) for m in ("wq", "wk"))
        v = (h @ w["wv"]).reshape(Bn, Tn, D // H, H)
        logits_BxNxTxS = np.where(causal_TxS, np.einsum("btnh,bsnh->bnts", q, k) * scale, -np.inf)
        top = logits_BxNxTxS.max(-1, keepdims=True)
        log_z = np.log(np.exp(logits_BxNxTxS - top).sum(-1)) + top[..., 0]
        probs = np.exp(logits_BxNxTxS - log_z[..., None])
        attn = np.einsum("bnts,bsnh->btnh", probs, v).reshape(Bn, Tn, D) @ w["wo"]
        x = x + attn
        mlp = _gelu(_rms_norm(x, w["mlp_norm"]) @ w["w_up"]) @ w["w_down"]
        x = x + mlp
        z_share = log_z[:max(1, Bn // ATTENTION_Z_SHARE)]  # the batch's first sequences
        for name, value in (("attn_z", np.mean(z_share**2)), ("attn_out", np.sqrt(np.mean(attn**2))),
                            ("mlp_out", np.sqrt(np.mean(mlp**2))),
                            ("block_out", np.sqrt(np.mean(x**2))),
                            ("outliers", _outlier_percent(x))):
            out[name].append(value)
    logits = _rms_norm(x, p["final_norm"]) @ _f64(p["readout"]) * model.logit_multiplier
    return out | {"logits": np.sqrt(np.mean(logits**2))}


def test_forward_indicators_match_a_hand_computation(one_step):
    """Attention Z, branch and residual RMS, outlier percent and logit RMS of the step's forward
    equal those of a float64 forward written out here, from the same parameters and batch."""
    s = one_step
    hand = _by_hand(s["model"], s["params"], s["batch"][0])
    for name, expected in hand.items():
        np.testing.assert_allclose(s["measured"][name], expected, rtol=RTOL, err_msg=name)
    assert np.all(np.asarray(hand["outliers"]) > 0)  # the massive feature is counted
    assert all(np.all(np.isfinite(v)) for v in s["measured"].values())


def test_gradient_norm_clip_factor_and_update_ratios_by_hand(one_step):
    """The global norm is optax.global_norm of the loss gradient, the factor
    min(1, clip_norm/‖g‖); the update/weight ratio of each group is ‖Δθ‖/‖θ‖ over its
    parameters."""
    s, clip = one_step, one_step["clip_norm"]
    grads = jax.jit(jax.grad(lambda p: next_token_loss(s["graphdef"], p, *s["batch"])))(
        s["params"])
    norm = float(optax.global_norm(grads))
    assert s["measured"]["grad_norm"] == pytest.approx(norm, rel=1e-6)
    assert norm > clip and s["measured"]["clip_scale"] == pytest.approx(clip / norm, rel=1e-6)
    assert (float(s["state"].clipped_sum), float(s["state"].clip_scale_sum)) == (
        1.0, pytest.approx(clip / norm, rel=1e-6))
    squares = {group: np.zeros(2) for group in GROUPS}
    for label, before, after in zip(jax.tree.leaves(s["labels"]), jax.tree.leaves(s["params"]),
                                    jax.tree.leaves(s["state"].params), strict=True):
        squares[label] += [np.sum((_f64(after) - _f64(before)) ** 2), np.sum(_f64(before) ** 2)]
    for group, (update, weight) in squares.items():
        np.testing.assert_allclose(s["measured"][f"update_ratio/{group}"],
                                   np.sqrt(update / weight), rtol=1e-3, err_msg=group)


def test_measuring_leaves_the_training_step_bit_for_bit(one_step):
    """Parameters, optimizer state, loss and clip sums equal those of the step that measures
    no indicators, to the last bit."""
    chex.assert_trees_all_equal(one_step["state"], one_step["plain"])


# One tiny run (the shapes of conftest's TINY_RUN) with σ_max every 6 steps and offline W&B.
@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("indicators")
    with pytest.MonkeyPatch.context() as patch:
        for name in ("DIR", "CACHE_DIR", "CONFIG_DIR"):
            patch.setenv(f"WANDB_{name}", str(tmp / name.lower()))
        result = train(to_run_config(compose([*TINY_RUN, f"train.out_dir={tmp / 'runs'}",
                                              "logging.wandb_mode=offline",
                                              "logging.indicators=true",
                                              "logging.spectral_every=6"])))
    run_dir = Path(result["run_dir"])
    (wandb_file,) = (run_dir / "wandb").glob("offline-run-*/*.wandb")
    return {"result": result, "metrics": read_jsonl(run_dir / "metrics.jsonl"),
            "spectral": read_jsonl(run_dir / "spectral.jsonl"),
            "wandb": finished_run_records(wandb_file), "run_dir": run_dir}


LAYERED = ("attn_z", "attn_out", "mlp_out", "block_out", "outliers")
INDICATORS = {"grad_norm", "clip_scale", "embed_out", "logits",
              *(f"{name}/{layer}" for name in LAYERED for layer in (0, 1)),
              *(f"update_ratio/{group}" for group in GROUPS)}


def test_every_logged_step_has_finite_indicators_and_clipping(run):
    records = run["metrics"]
    assert [r["step"] for r in records] == [3, 6, 9, 12]
    for r in records:
        assert INDICATORS | {"clipped_fraction", "mean_clip_scale"} <= r.keys()
        assert all(math.isfinite(r[key]) for key in INDICATORS), r
        assert 0 <= r["clipped_fraction"] <= 1 and 0 < r["mean_clip_scale"] <= 1
        assert r["clip_scale"] == pytest.approx(min(1.0, 1.0 / r["grad_norm"]), rel=1e-6)


def test_spectral_jsonl_rows_and_result(run):
    """Rows {"step", "sigma"} at steps 6 and 12, one σ per matrix and layer, never a gain;
    the last row is result.json's "spectral" and is within 2% of svd's, never above it."""
    rows = run["spectral"]
    assert [r["step"] for r in rows] == [6, 12] and all(r.keys() == {"step", "sigma"} for r in rows)
    names = {"embed", "readout", *(f"blocks/{m}/{layer}" for m in
                                   ("wq", "wk", "wv", "wo", "w_up", "w_down") for layer in (0, 1))}
    assert all(r["sigma"].keys() == names for r in rows)
    assert run["result"]["spectral"] == rows[-1]["sigma"]
    checkpointer = Checkpointer(run["run_dir"] / "checkpoints")
    try:
        _, state, _ = checkpointer.restore_latest(None)
    finally:
        checkpointer.close()
    cfg = to_run_config(compose(TINY_RUN))
    specs = make_parametrization(cfg.model, cfg.param, VOCAB).specs
    for path, name in ((("readout",), "readout"), (("blocks", "w_up"), "blocks/w_up/1")):
        matrices = as_matrices(leaf_at(state["params"], path), specs[path])
        exact = np.linalg.svd(np.asarray(matrices, np.float64), compute_uv=False)[:, 0]
        assert exact[-1] * 0.98 < rows[-1]["sigma"][name] <= exact[-1] * (1 + 1e-5), name


def test_result_summarises_clipping_and_indicators(run):
    """Clipped fraction and mean clip factor over all steps (each log's window weighted by its
    steps), every indicator's last and largest logged value."""
    result, records = run["result"], run["metrics"]
    saved = json.loads((run["run_dir"] / "result.json").read_text())
    assert saved == result
    steps = np.diff([0] + [r["step"] for r in records])
    for key, name in (("fraction", "clipped_fraction"), ("mean_scale", "mean_clip_scale")):
        expected = np.dot(steps, [r[name] for r in records]) / steps.sum()
        assert result["clipping"][key] == pytest.approx(expected, rel=1e-9)
    assert 0 < result["clipping"]["fraction"] < 1  # the tiny run clips some steps, not all
    assert any(r["clip_scale"] < 1 for r in records)
    assert result["indicators"]["last"].keys() == INDICATORS
    for key in INDICATORS:
        assert result["indicators"]["last"][key] == records[-1][key]
        assert result["indicators"]["max"][key] == max(r[key] for r in records)


def test_wandb_gets_indicators_spectra_and_clipping(run):
    history = [items(h.item) for h in of_type(run["wandb"], "history")]
    assert [h["_step"] for h in history] == [3, 6, 9, 12]
    assert all(INDICATORS | {"clipped_fraction"} <= h.keys() for h in history)
    spectral = [h for h in history if "spectral/readout" in h]
    assert [h["_step"] for h in spectral] == [6, 12]
    assert spectral[-1]["spectral/blocks/wq/1"] == run["spectral"][-1]["sigma"]["blocks/wq/1"]
    summary = {}
    for update in of_type(run["wandb"], "summary"):
        summary |= items(update.update)
    assert summary["clipping/fraction"] == run["result"]["clipping"]["fraction"]


def test_logging_fields_are_validated_and_leave_run_names_alone():
    cfg = to_run_config(compose(TINY_RUN))
    with pytest.raises(ConfigError, match=r"logging.spectral_every=-1: expected a non-negative"):
        validate(dataclasses.replace(cfg, logging=LoggingConfig(spectral_every=-1)))
    with pytest.raises(ConfigError, match="logging.indicators='yes': expected true or false"):
        to_run_config(compose([*TINY_RUN, "logging.indicators=yes"]))
    on = to_run_config(compose([*TINY_RUN, "logging.indicators=true",
                                "logging.spectral_every=6"]))
    assert (on.logging.indicators, cfg.logging.indicators) == (True, False)
    assert run_name(on) == run_name(cfg)
    assert to_run_config(compose([])).logging == LoggingConfig()
