"""`sweep.vectorize_lr=K`: K learning rates in one compiled program give what K separate runs give,
in the same directories, and a grid resumes and skips like separate runs."""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys
from pathlib import Path

import pytest

import experiments.train
import scaling.training.data
from experiments.compose import compose, to_run_config
from scaling.config import lr_grid
from scaling.training.loop import member_config, train, train_lrs, train_sweep
from scaling.training.rundir import run_name

# Measured: the largest |difference| of any logged loss between vmapped and separate runs is
# ~1e-6 after 12 steps (vmap batches the matmuls, so float32 sums round differently). A wrong LR,
# a shared optimizer state or a mixed-up member moves the losses by 1e-3 or more.
ATOL = 2e-5
# Every vmapped tiny_run group below trains three LRs, so that the tests share one compiled
# program (through the persistent compilation cache) instead of compiling one per group size.
LRS = [2.0**-9, 2.0**-7, 2.0**-5]


def _cfg(overrides):
    return to_run_config(compose(overrides))


def _losses(run_dir) -> list[float]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return [r[k] for r in records for k in ("train_loss", "val_loss") if k in r]


def test_vectorized_lrs_equal_separate_runs(tiny_run, tmp_path):
    """Same losses (to ATOL) at every logged step, same run directories, same result layout."""
    cfg = _cfg(tiny_run)
    together = train_lrs(dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, out_dir=str(tmp_path / "together"))), LRS)
    separate = [train(dataclasses.replace(member_config(cfg, lr), train=dataclasses.replace(
        cfg.train, out_dir=str(tmp_path / "separate")))) for lr in LRS]
    for v, s in zip(together, separate, strict=True):
        assert Path(v["run_dir"]).name == Path(s["run_dir"]).name
        assert v["config"]["optim"]["lr"] == s["config"]["optim"]["lr"]
        assert set(v) == set(s) and v["lrs_trained_together"] == 3
        assert s["lrs_trained_together"] == 1
        assert v["steps"] == s["steps"] == 12
        lv, ls = _losses(v["run_dir"]), _losses(s["run_dir"])
        assert len(lv) == len(ls) > 4
        assert lv == pytest.approx(ls, abs=ATOL)
    # the LRs really differ: a vmap that trained one LR K times would fail here
    finals = [r["val_loss"] for r in together]
    assert min(abs(a - b) for a, b in itertools.pairwise(finals)) > 100 * ATOL


def test_a_diverging_lr_does_not_stop_the_others(tiny_run, tmp_path):
    """One absurd LR diverges and records null losses; its neighbour trains to the end unchanged."""
    overrides = [*tiny_run, "model=mlp", "optim=sgd", "optim.clip_norm=0", "optim.warmup_steps=0"]
    cfg = _cfg(overrides)
    good, bad = together = train_lrs(cfg, [1e-2, 1e30])
    assert bad["diverged"] is True and bad["val_loss"] is None and 0 < bad["steps"] < 12
    assert good["diverged"] is False and good["steps"] == 12
    alone = train(dataclasses.replace(member_config(cfg, 1e-2), train=dataclasses.replace(
        cfg.train, out_dir=str(tmp_path / "alone"))))
    assert _losses(good["run_dir"]) == pytest.approx(_losses(alone["run_dir"]), abs=ATOL)
    assert [json.loads((Path(r["run_dir"]) / "result.json").read_text()) for r in together] \
        == together


def test_a_grid_skips_finished_lrs_and_trains_the_rest(tiny_run, monkeypatch):
    """A finished LR of the grid is reported, not retrained; a re-run of the grid trains nothing."""
    grid = [*tiny_run, "sweep.log2_lr_min=-8", "sweep.log2_lr_max=-6.5", "sweep.vectorize_lr=4"]
    cfg = _cfg(grid)
    lrs = lr_grid(cfg.sweep)
    assert lrs == [2.0**-8, 2.0**-7.5, 2.0**-7, 2.0**-6.5]
    first = train(member_config(cfg, lrs[1]))
    results = train_sweep(cfg)
    assert results[1] == first  # reported as it was, including its wall time
    assert [r["lrs_trained_together"] for r in results] == [3, 1, 3, 3]  # the unfinished, together
    assert [Path(r["run_dir"]).name for r in results] == [
        run_name(member_config(cfg, lr)) for lr in lrs]

    def no_training(*args, **kwargs):
        raise AssertionError("a finished grid must not train again")

    monkeypatch.setattr(scaling.training.data, "train_batch", no_training)
    monkeypatch.setattr("scaling.training.loop.make_step", no_training)
    assert train_sweep(cfg) == results


@pytest.mark.usefixtures("restore_root_logging")
def test_experiment_multirun_trains_the_grid_and_a_rerun_skips_it(tiny_run, tmp_path,
                                                                   monkeypatch):
    """`scaling-train -m +experiment=lr_width_sweep ...`: one job per width, each over the LR
    grid; running the same command again trains nothing and rewrites no result."""
    monkeypatch.setattr(sys, "argv", ["scaling-train"])
    # the default head_dim (one head at width 32) and three LRs a job keep width 64 the program
    # the tests above compiled
    argv = ["-m", "+experiment=lr_width_sweep", *tiny_run, "model.width=32,64", "train.seed=0",
            "param.base_width=32", "sweep.log2_lr_min=-8", "sweep.log2_lr_max=-7",
            "sweep.log2_lr_step=0.5", "sweep.vectorize_lr=3"]
    experiments.train.main(argv)
    results = sorted((tmp_path / "runs").glob("*/result.json"))
    configs = [json.loads(p.read_text())["config"] for p in results]
    assert sorted((c["model"]["width"], c["optim"]["lr"]) for c in configs) == [
        (width, 2.0**log2_lr) for width in (32, 64) for log2_lr in (-8, -7.5, -7)]
    assert {json.loads(p.read_text())["lrs_trained_together"] for p in results} == {3}
    assert len({c["logging"]["group"] for c in configs}) == 1
    stamps = [p.stat().st_mtime_ns for p in results]

    def no_training(*args, **kwargs):
        raise AssertionError("a finished sweep must not train again")

    monkeypatch.setattr("scaling.training.loop.make_step", no_training)
    experiments.train.main(argv)
    assert [p.stat().st_mtime_ns for p in sorted((tmp_path / "runs").glob("*/result.json"))] \
        == stamps


def test_an_interrupted_grid_resumes_as_separate_runs(tiny_run, tmp_path, monkeypatch):
    """Each LR checkpoints its own state in the separate-run layout: after a crash mid-grid, a
    separate run at one of its LRs resumes from that checkpoint and ends where an uninterrupted
    run ends."""
    cfg = _cfg(tiny_run)
    batch = scaling.training.data.train_batch

    def crash_at_step_8(tokens, seed, step, *args):
        if step == 8:
            raise KeyboardInterrupt
        return batch(tokens, seed, step, *args)

    monkeypatch.setattr(scaling.training.data, "train_batch", crash_at_step_8)
    with pytest.raises(KeyboardInterrupt):
        train_lrs(cfg, LRS)
    monkeypatch.setattr(scaling.training.data, "train_batch", batch)
    resumed = train(member_config(cfg, LRS[0]))
    records = [json.loads(line) for line in
               (Path(resumed["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert resumed["steps"] == 12 and records[0]["step"] == 3  # kept the grid's first lines
    fresh = train(dataclasses.replace(member_config(cfg, LRS[0]), train=dataclasses.replace(
        cfg.train, out_dir=str(tmp_path / "fresh"))))
    assert _losses(resumed["run_dir"]) == pytest.approx(_losses(fresh["run_dir"]), abs=ATOL)
