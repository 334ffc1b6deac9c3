"""A preempted run checkpoints the step it stopped at and hands the signal on; the requeued job
(the same config again) resumes there and ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal

import pytest
from conftest import TINY_RUN

from experiments.compose import compose, to_run_config
from scaling.training import data
from scaling.training.loop import train
from scaling.training.preemption import StopSignals

PREEMPTED_AT = 5  # the signal arrives while step 5's batch is drawn: step 5 is the last trained


class Requeued(Exception):
    """What the launcher's handler does in this test instead of requeueing the job."""


def _config(out_dir) -> object:
    return to_run_config(compose([*TINY_RUN, f"train.out_dir={out_dir}",
                                  "train.checkpoint_every=100"]))


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> dict:
    """The run trained without interruption."""
    return train(_config(tmp_path_factory.mktemp("whole")))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR2])
def test_preempted_run_checkpoints_and_resumes_exactly(tmp_path, monkeypatch, capsys, signum,
                                                       whole):
    """...and says so: one line when it stops (the signal, step and checkpoint), one when it
    resumes (from which step)."""
    cfg = _config(tmp_path / "runs")
    handled = []

    def launcher_handler(number, frame):  # stands in for submitit's requeue (or SLURM's kill)
        handled.append(number)
        raise Requeued

    previous = signal.signal(signum, launcher_handler)
    draw = data.train_batch

    def preempting_batch(tokens, seed, step, *shape, **rows):
        if step == PREEMPTED_AT - 1 and not handled:
            os.kill(os.getpid(), signum)
        return draw(tokens, seed, step, *shape, **rows)

    try:
        monkeypatch.setattr(data, "train_batch", preempting_batch)
        with pytest.raises(Requeued):
            train(cfg)
    finally:
        signal.signal(signum, previous)
    assert handled == [signum]
    run_dir = next((tmp_path / "runs").iterdir())
    assert not (run_dir / "result.json").exists()
    steps = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [PREEMPTED_AT]  # not a checkpoint_every step: saved for the preemption
    said = capsys.readouterr().err
    assert (f"{run_dir.name}: stopped by {signum.name} after step {PREEMPTED_AT}, checkpointed "
            f"to {run_dir}/checkpoints; the same command resumes from step {PREEMPTED_AT}") in said
    assert f"{run_dir.name}: starting, 12 steps, batches of 4×32 tokens, on 1 device (cpu)" in said
    resumed = train(cfg)  # the requeued job
    assert (f"{run_dir.name}: resuming from the checkpoint of step {PREEMPTED_AT} in {run_dir}/"
            f"checkpoints, {12 - PREEMPTED_AT} of 12 steps to go") in capsys.readouterr().err
    assert resumed["steps"] == whole["steps"]
    assert resumed["val_loss"] == whole["val_loss"] and resumed["train_loss"] == whole["train_loss"]
    logged = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged == sorted(set(logged))  # no step logged twice across the preemption


def test_stop_signals_restore_the_handlers_they_replaced():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        assert signal.getsignal(signal.SIGTERM) != before
        assert not stop.requested(1)
    assert signal.getsignal(signal.SIGTERM) == before
