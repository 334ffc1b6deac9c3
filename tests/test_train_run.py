"""End-to-end runs of the training loop: learning, result files, resume, divergence, multirun."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import chex
import jax
import numpy as np
import pytest
from conftest import TINY_RUN

import experiments.train
import scaling.training.data
from experiments.compose import compose, to_run_config
from scaling.files import read_jsonl
from scaling.training.checkpoint import Checkpointer
from scaling.training.loop import train
from scaling.training.rundir import run_name

RESULT_KEYS = {"train_loss", "val_loss", "diverged", "steps", "tokens", "params",
               "flops_per_token", "wall_seconds"}
# Mean per-byte entropy of the stdlib corpus under a unigram model is ~3.24 nats, so a
# validation loss below 3.0 needs context, far below the uniform ln(256) = 5.545.
LEARNED_VAL_LOSS = 3.0


# Hydra's job logging rebinds the root logger in the multirun tests: every test restores it.
pytestmark = pytest.mark.usefixtures("restore_root_logging")


def _config(overrides: list[str]):
    return to_run_config(compose(overrides))


def _metrics(run_dir: Path) -> list[dict]:
    return read_jsonl(Path(run_dir) / "metrics.jsonl")


def _deterministic(records: list[dict]) -> list[dict]:
    """Metrics without the wall-clock throughput, which no two runs share."""
    return [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in records]


def _result(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "result.json").read_text())


def _final_state(run_dir: Path) -> tuple[int, dict]:
    """(step, train state) of the newest checkpoint: parameters, optimizer state, loss sums."""
    checkpointer = Checkpointer(Path(run_dir) / "checkpoints")
    try:
        step, state, _ = checkpointer.restore_latest(None)
    finally:
        checkpointer.close()
    return step, state


def _crash_at(monkeypatch, crash_step: int) -> None:
    """Makes the batch for `crash_step` raise once, like a process dying mid-run."""
    original, crashed = scaling.training.data.train_batch, []

    def train_batch(tokens, seed, step, batch_size, seq_len, **rows):
        if step == crash_step and not crashed:
            crashed.append(step)
            raise RuntimeError(f"simulated crash at step {step}")
        return original(tokens, seed, step, batch_size, seq_len, **rows)

    monkeypatch.setattr(scaling.training.data, "train_batch", train_batch)


def test_short_run_learns_the_default_corpus(tmp_path):
    """A 60-step tiny_run Transformer on the stdlib bytes beats the unigram entropy; files complete."""
    overrides = ["model.width=64", "model.depth=2", "param.base_width=32", "train.steps=60",
                 "train.batch_size=16", "train.seq_len=32", "train.eval_every=20",
                 "train.eval_batches=4", "train.log_every=5", "train.checkpoint_every=60",
                 "optim.lr=0.03", "optim.warmup_steps=4", "logging.wandb_mode=disabled",
                 "logging.progress=false", f"train.out_dir={tmp_path / 'runs'}"]
    cfg = _config(overrides)
    assert cfg.data.path is None

    result = train(cfg)

    saved = _result(result["run_dir"])
    assert RESULT_KEYS <= saved.keys()
    assert saved["diverged"] is False
    assert saved["val_loss"] < LEARNED_VAL_LOSS, saved["val_loss"]
    assert math.isfinite(saved["train_loss"]) and saved["train_loss"] < math.log(256)
    assert saved["steps"] == 60 and saved["tokens"] == 60 * 16 * 32
    assert saved["params"] > 0 and saved["flops_per_token"] > 0 and saved["wall_seconds"] > 0
    assert saved["data"].startswith("stdlib")
    assert saved["val_loss_per_byte"] == saved["val_loss"]  # a byte is a token
    records = _metrics(result["run_dir"])
    assert [r["step"] for r in records] == list(range(5, 61, 5))
    assert [r["step"] for r in records if "val_loss" in r] == [20, 40, 60]
    assert all({"step", "tokens", "lr", "train_loss", "tokens_per_second"} <= r.keys()
               for r in records)
    assert records[-1]["val_loss"] == saved["val_loss"]
    assert records[-1]["train_loss"] == saved["train_loss"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[list[str], dict]:
    """(overrides, result) of one finished tiny_run run: the reference every resume test ends
    equal to, and the finished run the re-run test re-reads. Nothing may write into it."""
    overrides = [*TINY_RUN, f"train.out_dir={tmp_path_factory.mktemp('uninterrupted')}"]
    return overrides, train(_config(overrides))


def _assert_ends_like(run_dir: Path, whole: dict) -> None:
    """The run at `run_dir` finished with the metrics, result and final train state (parameters,
    optimizer state, loss sums) of the uninterrupted run `whole`, bit for bit."""
    assert _deterministic(_metrics(run_dir)) == _deterministic(_metrics(whole["run_dir"]))
    assert [r["step"] for r in _metrics(run_dir)] == [3, 6, 9, 12]
    resumed = _result(run_dir)
    assert (resumed["train_loss"], resumed["val_loss"], resumed["steps"]) == (
        whole["train_loss"], whole["val_loss"], 12)
    (step_b, state_b), (step_a, state_a) = _final_state(run_dir), _final_state(whole["run_dir"])
    assert step_a == step_b == 12
    chex.assert_trees_all_equal(state_b, state_a)  # bit for bit, optimizer state included


def test_resume_after_an_in_process_crash_is_bit_exact(uninterrupted, tmp_path, monkeypatch,
                                                       caplog):
    """A run crashed after a checkpoint, then re-run, ends identical to an uninterrupted one;
    its restored state is placed as a fresh one is, so the resumed step is the program the
    first start compiled (the persistent compilation cache serves it)."""
    _, whole = uninterrupted
    cfg = _config([*TINY_RUN, f"train.out_dir={tmp_path / 'b'}"])
    _crash_at(monkeypatch, crash_step=10)  # checkpoint at 6, a metrics line at 9, then the crash
    options = {"jax_persistent_cache_min_compile_time_secs": 0.0, "jax_log_compiles": True}
    previous = {option: getattr(jax.config, option) for option in options}
    for option, value in options.items():
        jax.config.update(option, value)
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            train(cfg)
        run_dir = tmp_path / "b" / run_name(cfg)
        assert not (run_dir / "result.json").exists()
        assert [r["step"] for r in _metrics(run_dir)] == [3, 6, 9]

        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="jax"):
            resumed = train(cfg)
    finally:
        for option, value in previous.items():
            jax.config.update(option, value)
    assert any("cache hit for 'jit_train_step'" in r.getMessage() for r in caplog.records), [
        r.getMessage() for r in caplog.records if "train_step" in r.getMessage()]

    assert Path(resumed["run_dir"]) == run_dir and run_dir.name == Path(whole["run_dir"]).name
    assert (resumed["train_loss"], resumed["val_loss"]) == (whole["train_loss"],
                                                           whole["val_loss"])
    _assert_ends_like(run_dir, whole)


# The kill -9 child: the real command line, held before its 10th step so that the kill lands
# mid-run however fast or slow the machine is. The parent kills it as soon as it logs step 9,
# while the asynchronous checkpoints are still being written (measured: 3 complete, 6 in its
# temporary folder), so the resume also has to discard a half-written checkpoint.
HELD_AT_STEP = 9
HOLD_CHILD = f"""
import runpy, time
import scaling.training.data as data
batch = data.train_batch
def train_batch(tokens, seed, step, *args, **rows):
    if step == {HELD_AT_STEP}:
        time.sleep(600)
    return batch(tokens, seed, step, *args, **rows)
data.train_batch = train_batch
runpy.run_module("experiments.train", run_name="__main__", alter_sys=True)
"""


def test_resume_after_kill_9_is_bit_exact(uninterrupted, tmp_path, monkeypatch):
    """`kill -9` mid-run, then the same command again: the run ends as an uninterrupted one."""
    _, whole = uninterrupted
    # a checkpoint every 3 steps, so that one is complete at the kill; the cadence changes the
    # run's directory name but nothing that is trained
    argv = [*TINY_RUN, "train.checkpoint_every=3", f"train.out_dir={tmp_path / 'killed'}"]
    run_dir = tmp_path / "killed" / run_name(_config(argv))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "WANDB_MODE": "disabled",
           "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5"}
    proc = subprocess.Popen([sys.executable, "-c", HOLD_CHILD, *argv], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            steps = [r["step"] for r in _metrics(run_dir)]
            if steps and steps[-1] >= HELD_AT_STEP:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"run ended before the kill: {proc.stderr.read().decode()}"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert not (run_dir / "result.json").exists()
    assert [r["step"] for r in _metrics(run_dir)] == [3, 6, 9]
    assert any(p.name.isdigit() for p in (run_dir / "checkpoints").iterdir())

    monkeypatch.setattr(sys, "argv", ["scaling-train"])
    experiments.train.main(argv)  # the same command line, to completion

    _assert_ends_like(run_dir, whole)


def test_rerunning_a_finished_run_reports_without_training(uninterrupted, monkeypatch):
    """A second call on a finished run returns the saved result and trains nothing."""
    overrides, first = uninterrupted
    result_file = Path(first["run_dir"]) / "result.json"
    saved, mtime = result_file.read_bytes(), result_file.stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run must not train again")

    monkeypatch.setattr(scaling.training.data, "train_batch", no_training)
    monkeypatch.setattr("scaling.training.loop.make_step", no_training)
    second = train(_config(overrides))

    assert second == first == json.loads(saved)
    assert result_file.read_bytes() == saved and result_file.stat().st_mtime_ns == mtime


def test_run_name_is_deterministic_and_tracks_what_is_trained(tiny_run, tmp_path):
    """The run directory name is a function of the trained config, not of where it is written."""
    cfg = _config(tiny_run)
    assert run_name(cfg) == run_name(_config(tiny_run))
    assert run_name(cfg) == run_name(_config([*tiny_run, f"train.out_dir={tmp_path / 'other'}",
                                              "logging.group=g"]))
    assert run_name(cfg) != run_name(_config([*tiny_run, "optim.lr=0.02"]))
    assert run_name(cfg) != run_name(_config([*tiny_run, "train.seed=1"]))
    assert run_name(cfg) != run_name(_config([*tiny_run, "optim.b2=0.99"]))
    assert run_name(cfg).startswith("transformer-w64-d2-mup-adamw-lr0.01-s0-")


def test_divergence_is_recorded_and_exits_cleanly(tiny_run, tmp_path, monkeypatch):
    """An absurd learning rate ends the run early with diverged: true, null losses, exit 0."""
    argv = [*tiny_run, "model=mlp", "optim=sgd", "optim.lr=1e30", "optim.clip_norm=0",
            "optim.warmup_steps=0"]
    monkeypatch.setattr(sys, "argv", ["scaling-train"])

    experiments.train.main(argv)  # returns normally: exit code 0

    (run_dir,) = (tmp_path / "runs").iterdir()
    result = _result(run_dir)
    assert result["diverged"] is True
    assert result["train_loss"] is None and result["val_loss"] is None
    assert 0 < result["steps"] < 12
    assert not math.isfinite(_metrics(run_dir)[-1]["train_loss"])


def test_hydra_multirun_trains_every_point(tiny_run, tmp_path, monkeypatch):
    """`-m optim.lr=1e-3,1e-2` runs two jobs through Hydra, each with its own result."""
    monkeypatch.setattr(sys, "argv", ["scaling-train"])

    experiments.train.main(["-m", "optim.lr=1e-3,1e-2", *tiny_run])

    run_dirs = sorted(p for p in (tmp_path / "runs").iterdir() if p.is_dir())
    results = [_result(p) for p in run_dirs]
    assert sorted(r["config"]["optim"]["lr"] for r in results) == [1e-3, 1e-2]
    assert all(r["steps"] == 12 and r["diverged"] is False for r in results)
    groups = {r["config"]["logging"]["group"] for r in results}
    assert len(groups) == 1 and groups.pop().startswith("sweep-")


def test_a_checkpoint_without_a_newer_state_field_resumes_with_it_fresh(tmp_path):
    """A checkpoint written before the train state had some leaf (here: the clip sums, and
    MeZO's state as a plain dict) restores into today's template: the saved leaves as saved,
    the missing ones from the template; a leaf the state does not have is an error."""
    from scaling.steps.state import TrainState
    from scaling.steps.zeroth_order import ZOState
    from scaling.training.checkpoint import Checkpointer

    opt_state = {"count": np.int32(7), "g": np.ones(2, np.float32)}
    old = {"params": {"w": np.arange(3, dtype=np.float32)}, "opt_state": opt_state,
           "lr": np.float32(0.1), "loss_sum": np.float32(2.5), "loss_count": np.int32(3)}
    checkpointer = Checkpointer(tmp_path / "checkpoints")
    checkpointer.save(6, old, {"wall_seconds": 1.0})
    checkpointer.close()
    template = TrainState.start({"w": np.zeros(3, np.float32)},
                                ZOState(np.int32(0), {}, np.float32(-1), np.zeros(2, np.float32),
                                        np.float32(0)), 0.0)
    checkpointer = Checkpointer(tmp_path / "checkpoints")
    try:
        step, restored, meta = checkpointer.restore_latest(template.as_dict())
        with pytest.raises(ValueError, match="not in the train state"):
            checkpointer.restore_latest({"params": {"w": np.zeros(3, np.float32)}})
    finally:
        checkpointer.close()
    state = TrainState.from_dict(restored)
    assert (step, meta) == (6, {"wall_seconds": 1.0})
    np.testing.assert_array_equal(state.params["w"], [0, 1, 2])
    assert (int(state.opt_state.count), float(state.loss_sum), int(state.loss_count)) == (7, 2.5, 3)
    assert float(state.opt_state.curvature_sum) == -1  # not in the checkpoint: the template's
    assert float(state.clipped_sum) == 0 and float(state.clip_scale_sum) == 0
