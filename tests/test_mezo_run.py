"""`optim=mezo` through the training loop: the (step, g, lr) log replays to the trained
parameters bit for bit, across a crash and resume; the real estimate program (perturbing layer
by layer) gives the eager perturbation's g; Sparse MeZO freezes the masked weights; bf16 weights
stay bf16 and train; the curvature monitor is logged and caps the LR.

One tiny byte-MLP run (bf16 weights with stochastic rounding, sparsity 0.5, curvature monitor
and safe LR on), crashed after a checkpoint and resumed, is shared by every test here:
each option is checked on it, and its programs are compiled once (twice: a resumed run's
"""

from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_RUN
from flax import nnx

import scaling.training.data
from experiments.compose import compose, to_run_config
from optim.mezo import leaf_noise, perturb, probe_key, probe_losses, projected_gradient, step_key
from optim.objectives import OBJECTIVES
from scaling.files import read_jsonl
from scaling.parametrization import build_model
from scaling.steps.zeroth_order import ZerothOrderStep, init_zo_state, replay, zo_setup
from scaling.training import data
from scaling.training.checkpoint import Checkpointer
from scaling.training.loop import train
from scaling.training.replay import replay_run
from scaling.training.rundir import run_name

SAFE_LR = 0.05
# a rolled scan (one copy of each layer's probe draw to compile) and one evaluation, at the end
MEZO_RUN = [*TINY_RUN, "model=mlp", "model.scan_unroll=1", "train.eval_every=12",
            "optim=mezo", "optim.lr=0.01", "optim.warmup_steps=0", "optim.param_dtype=bfloat16",
            "optim.sparsity=0.5", "optim.curvature=true", f"optim.safe_lr={SAFE_LR}"]
STEPS = 12  # TINY_RUN's train.steps
ZO_LOG = ZerothOrderStep.log_name


def _config(out_dir: Path):
    return to_run_config(compose([*MEZO_RUN, f"train.out_dir={out_dir}"]))


def _start(cfg):
    """(graphdef, MeZO setup, initial train state: bf16 weights, thresholds) of `cfg`'s run."""
    model, parametrization = build_model(cfg.model, cfg.param, cfg.data.source_vocab_size,
                                         cfg.train.seed)
    graphdef, params = nnx.split(model)
    setup = zo_setup(cfg.optim, parametrization, total_steps=cfg.train.steps,
                     seed=cfg.train.seed)
    state = init_zo_state(params.to_pure_dict(), setup, cfg.optim.lr)
    return graphdef, setup, state.as_dict()


def _final_state(run_dir: Path, template) -> tuple[int, dict]:
    checkpointer = Checkpointer(run_dir / "checkpoints")
    try:
        step, state, _ = checkpointer.restore_latest(template)  # a dict, as checkpointed
    finally:
        checkpointer.close()
    return step, state


@pytest.fixture(scope="module")
def mezo_run(tmp_path_factory) -> dict:
    """The shared run, crashed before its 11th step (after the step-6 checkpoint, with steps up
    to 10 logged) and run again to the end: its config, directory, logs (the zo log as it was
    at the crash, too), initial and final train state."""
    cfg = _config(tmp_path_factory.mktemp("mezo"))
    run_dir = Path(cfg.train.out_dir) / run_name(cfg)
    original = scaling.training.data.train_batch

    def crash_at_10(tokens, seed, step, batch_size, seq_len, **rows):
        if step == 10:
            raise RuntimeError("simulated crash")
        return original(tokens, seed, step, batch_size, seq_len, **rows)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(scaling.training.data, "train_batch", crash_at_10)
        with pytest.raises(RuntimeError, match="simulated crash"):
            train(cfg)
    crashed_log = read_jsonl(run_dir / ZO_LOG)
    result = train(cfg)
    graphdef, setup, start = _start(cfg)
    start = jax.device_get(start)
    step, final = _final_state(run_dir, start)
    return {"cfg": cfg, "result": result, "run_dir": run_dir, "graphdef": graphdef,
            "setup": setup, "start": start, "final": final, "step": step,
            "crashed_log": crashed_log, "zo_log": read_jsonl(run_dir / ZO_LOG),
            "metrics": read_jsonl(run_dir / "metrics.jsonl")}


def _assert_params_equal(a, b) -> None:
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))


def test_log_replays_to_the_trained_parameters_bit_for_bit(mezo_run):
    """zo_steps.jsonl holds (step, g, lr) for steps 1..12, each once although steps 7..10 ran
    twice, with one g per probe (several probes: test_mezo.py); replaying it from the initial parameters gives the final
    checkpoint's bf16 parameters bit for bit, stochastic rounding and the sparse mask included,
    with no forward pass, and so does replay_run from the run directory; one step fewer does
    not."""
    log = mezo_run["zo_log"]
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))
    assert all(set(r) == {"step", "g", "lr"} and len(r["g"]) == 1 for r in log)
    assert all(math.isfinite(g) for r in log for g in r["g"]) and any(r["g"][0] for r in log)
    assert mezo_run["step"] == STEPS
    start, final = mezo_run["start"]["params"], mezo_run["final"]["params"]
    replayed = replay(jax.tree.map(jnp.asarray, start), mezo_run["setup"], log)
    _assert_params_equal(replayed, final)
    _assert_params_equal(replay_run(mezo_run["run_dir"]), final)  # from the run's files alone
    assert not np.array_equal(start["readout"], final["readout"])  # it did train
    short = replay(jax.tree.map(jnp.asarray, start), mezo_run["setup"], log[:-1])
    assert not all(np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(short), jax.tree.leaves(final), strict=True))


def test_resumed_steps_repeat_the_crashed_run_bit_for_bit(mezo_run):
    """The crash left steps 1..10 in the log; the resumed run, restarted from step 6, logged
    steps 7..10 again with the same g and lr bit for bit (the step's keys come from the
    restored count), so it took the uninterrupted run's path, which the replay reproduces."""
    crashed, log = mezo_run["crashed_log"], mezo_run["zo_log"]
    assert [r["step"] for r in crashed] == list(range(1, 11))
    assert log[:10] == crashed
    assert mezo_run["result"]["steps"] == STEPS


def test_lazy_estimate_of_the_run_matches_eager_perturbation(mezo_run):
    """The run's first g (the estimate program, perturbing layer by layer inside the scan)
    equals g from the whole perturbed tree at the same (seed, step 0), bit for bit, on the
    run's first batch: lazy and eager perturbation give the same losses, hence the same step."""
    cfg, setup, graphdef = mezo_run["cfg"], mezo_run["setup"], mezo_run["graphdef"]
    t, o = cfg.train, cfg.optim
    splits = data.load(cfg.data, t.seq_len)
    inputs, targets = data.train_batch(splits.train, t.seed, 0, t.batch_size, t.seq_len)
    start = jax.tree.map(jnp.asarray, mezo_run["start"])

    @jax.jit
    def eager_gs(params, thresholds):
        def loss_at(key, scale):
            logits = nnx.merge(graphdef, perturb(params, setup.plan, thresholds, key, scale))(
                inputs)
            return OBJECTIVES[o.objective](logits.astype(jnp.float32), targets)

        losses = probe_losses(loss_at, step_key(t.seed, 0), o.n_probes, o.eps)
        return projected_gradient(*losses, o.eps)

    gs = eager_gs(start["params"], start["opt_state"].thresholds)
    assert np.asarray(gs, np.float32).tolist() == mezo_run["zo_log"][0]["g"]


def test_logged_step_updates_along_the_estimates_probe(mezo_run):
    """The parameters after the first logged step (replayed: bit for bit the trained ones)
    against the update built by hand from that step's (g, lr) along the probe z the eager
    perturbation draws at (seed, step 0): θ − lr·g·(U/e)·z on the entries under the sparse
    mask, within bf16's stochastic rounding (less than one bf16 step, 2^−7 relative), and
    unchanged elsewhere. An update drawing another probe than the estimate's is off by
    lr·g·|z − z'|, far beyond that."""
    setup, start = mezo_run["setup"], jax.device_get(mezo_run["start"])
    (record,) = mezo_run["zo_log"][:1]
    (g,) = record["g"]
    stepped = replay(jax.tree.map(jnp.asarray, start["params"]), setup, [record])
    key = probe_key(step_key(mezo_run["cfg"].train.seed, 0), 0)
    probes = jax.tree.leaves(setup.plan, is_leaf=lambda p: hasattr(p, "leaf_id"))
    for (path, x0), x1, probe, threshold in zip(
            jax.tree_util.tree_leaves_with_path(start["params"]), jax.tree.leaves(stepped),
            probes, jax.tree.leaves(start["opt_state"].thresholds), strict=True):
        x0, x1 = np.asarray(x0, np.float32), np.asarray(x1, np.float32)
        z = np.asarray(leaf_noise(key, probe, x0.shape))
        expected = x0 - record["lr"] * g * (probe.update_scale / probe.eps_scale) * z
        free = np.ones_like(x0, bool) if not probe.sparse else (
            np.abs(x0) <= np.reshape(threshold, (-1,) + (1,) * (x0.ndim - 1)))
        np.testing.assert_array_equal(x1[~free], x0[~free], err_msg=str(path))
        np.testing.assert_allclose(x1[free], expected[free], rtol=2.0**-7, atol=1e-30,
                                   err_msg=str(path))
        assert np.any(x1[free] != x0[free]), path  # the step did move them


def test_sparse_mezo_leaves_masked_weights_untouched(mezo_run):
    """sparsity 0.5: after 12 steps every weight above its leaf's (per layer) threshold, fixed
    from the initial weights, is unchanged bit for bit, about half of each matrix has moved,
    and every vector entry has moved (vectors are dense)."""
    setup, start, final = mezo_run["setup"], mezo_run["start"], mezo_run["final"]
    thresholds = start["opt_state"].thresholds
    _assert_params_equal(final["opt_state"].thresholds, thresholds)  # fixed at init
    matrices = 0
    for (path, x0), x1, probe, t in zip(
            jax.tree_util.tree_leaves_with_path(start["params"]),
            jax.tree.leaves(final["params"]),
            jax.tree.leaves(setup.plan, is_leaf=lambda p: hasattr(p, "leaf_id")),
            jax.tree.leaves(thresholds), strict=True):
        x0, x1 = np.asarray(x0, np.float32), np.asarray(x1, np.float32)
        moved = x1 != x0
        if not probe.sparse:
            assert np.all(moved), path
            continue
        matrices += 1
        layers = x0.shape[0] if probe.stacked else 1
        frozen = np.abs(x0) > np.reshape(t, (-1,) + (1,) * (x0.ndim - 1))
        assert frozen.any() and not moved[frozen].any(), path
        fraction = moved.reshape(layers, -1).mean(axis=1)
        assert np.all((0.3 < fraction) & (fraction <= 0.5 + 1e-3)), (path, fraction)
    assert matrices == 3  # embed, layers/w, readout


def test_bf16_run_keeps_bf16_weights_and_trains(mezo_run):
    """optim.param_dtype=bfloat16: the train state holds bf16 weights (as checkpointed, read
    back without a template to cast to), and the run's train loss is finite and lower at its
    end than at its first record."""
    _, saved = _final_state(mezo_run["run_dir"], None)
    assert {str(x.dtype) for x in jax.tree.leaves(saved["params"])} == {"bfloat16"}
    losses = [r["train_loss"] for r in mezo_run["metrics"]]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
    assert mezo_run["result"]["diverged"] is False


def test_curvature_is_logged_and_safe_lr_caps_the_lr(mezo_run):
    """optim.curvature=true: every metrics record carries the Hessian-trace average, and the LR
    applied (zo log and metrics) is min(lr, safe_lr / that average) once it is positive; the
    cap binds in this run."""
    lr, log = mezo_run["cfg"].optim.lr, mezo_run["zo_log"]
    records = mezo_run["metrics"]
    assert [r["step"] for r in records] == [3, 6, 9, 12]
    capped = 0
    for record in records:
        trace, applied = record["curvature"], log[record["step"] - 1]["lr"]
        assert math.isfinite(trace) and record["lr"] == applied
        expected = min(lr, SAFE_LR / trace) if trace > 0 else lr
        assert applied == pytest.approx(expected, rel=1e-5), (record, applied)
        capped += applied < lr * (1 - 1e-6)
    assert capped > 0
