"""A sweep analysed while some runs are unfinished (preempted, killed or still going): the analysis
covers the finished runs and lists the others with how far they got."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from synthetic import assert_one_line_cli_error, call_main, run_result, write_results

from experiments.analyze import main
from scaling.analysis import analyze, format_table, load_results, unfinished_runs
from scaling.training.analysis_run import _summary

KILLED = "transformer-w128-d2-mup-adamw-lr0.0078125-s0-0a1b2c3d"  # logged to 9, checkpoint at 6
STARTED = "transformer-w128-d2-mup-adamw-lr0.015625-s0-4e5f6a7b"  # killed before its first log
KILLED_LINE = f"unfinished: {KILLED} (step 9 logged, checkpoint at 6)"


def write_finished(root: Path) -> list[str]:
    """Two widths × three LRs of finished runs, one of them with the logs a run leaves beside its
    result.json; returns their names."""
    results = [run_result("mup", width, log2_lr, 0, 3.0 + 0.1 * (log2_lr + 7) ** 2, root=root)
               for width in (64, 128) for log2_lr in (-8, -7, -6)]
    write_results(root, results)
    logged = root / results[0]["name"]
    (logged / "metrics.jsonl").write_text('{"step": 100, "train_loss": 3.1}\n')
    (logged / "checkpoints" / "100").mkdir(parents=True)
    return sorted(r["name"] for r in results)


def write_unfinished(root: Path) -> None:
    """A run killed mid-write (a cut-off metrics line, an orbax save cut short) and one killed
    before it logged anything."""
    killed = root / KILLED
    (killed / "checkpoints" / "6").mkdir(parents=True)
    (killed / "checkpoints" / "12.orbax-checkpoint-tmp-1718000000").mkdir()
    (killed / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "train_loss": 5.0 - 0.1 * s}) + "\n" for s in (3, 6, 9))
        + '{"step": 12, "train_lo')
    started = root / STARTED
    (started / "checkpoints").mkdir(parents=True)
    (started / "metrics.jsonl").write_text("")


def write_non_runs(root: Path) -> None:
    """What launchers, W&B and earlier analyses leave in a sweep folder: none of it is a run."""
    (root / ".submitit" / "1234_0").mkdir(parents=True)
    (root / ".submitit" / "1234_0" / "1234_0_log.out").write_text("started\n")
    (root / "multirun.yaml").write_text("hydra: {}\n")
    (root / "transformer-w64-d2-mup-adamw-lr0.001-s0-deadbeef" / "wandb" / "run-1").mkdir(
        parents=True)
    (root / "analysis" / "stale").mkdir(parents=True)
    (root / "analysis" / "stale" / "metrics.jsonl").write_text('{"step": 1}\n')


@pytest.fixture
def sweep(tmp_path) -> tuple[Path, list[str]]:
    root = tmp_path / "sweep"
    finished = write_finished(root)
    write_unfinished(root)
    write_non_runs(root)
    return root, finished


def test_unfinished_runs_say_how_far_each_got(sweep):
    root, _ = sweep

    assert unfinished_runs(root) == [
        {"name": KILLED, "run_dir": str(root / KILLED), "logged_step": 9, "checkpoint_step": 6,
         "steps": None},
        {"name": STARTED, "run_dir": str(root / STARTED), "logged_step": None,
         "checkpoint_step": None, "steps": None}]


def test_analysis_covers_the_finished_runs_and_lists_the_rest(sweep):
    root, finished = sweep

    results = load_results(root)
    analysis = analyze(results, unfinished=unfinished_runs(root))

    assert [r["name"] for r in analysis["runs"]] == finished
    assert [s["width"] for s in analysis["shapes"]] == [64, 128]
    assert [u["name"] for u in analysis["unfinished"]] == [KILLED, STARTED]
    table = format_table(analysis).splitlines()
    assert table[-3:] == [KILLED_LINE,
                          f"unfinished: {STARTED} (step none logged, checkpoint at none)",
                          "unfinished runs left out of the analysis: 2"]
    assert _summary(analysis)["unfinished"] == 2


def test_a_finished_sweep_lists_nothing_unfinished(tmp_path):
    write_finished(tmp_path)

    analysis = analyze(load_results(tmp_path), unfinished=unfinished_runs(tmp_path))

    assert analysis["unfinished"] == []
    assert "unfinished" not in format_table(analysis)


def test_scaling_analyze_prints_and_saves_the_unfinished_runs(sweep):
    root, finished = sweep

    code, printed = call_main(main, [str(root), "--wandb-mode", "disabled"])

    assert code == 0
    assert KILLED_LINE in printed.splitlines()
    analysis = json.loads((root / "analysis" / "analysis.json").read_text())
    assert [r["name"] for r in analysis["runs"]] == finished
    assert [(u["name"], u["logged_step"], u["checkpoint_step"]) for u in analysis["unfinished"]] \
        == [(KILLED, 9, 6), (STARTED, None, None)]


def test_nothing_finished_is_a_one_line_error_counting_the_unfinished(tmp_path, capsys):
    root = tmp_path / "sweep"
    write_unfinished(root)
    write_non_runs(root)

    with pytest.raises(FileNotFoundError, match=r"no run has finished yet \(2 unfinished"):
        load_results(root)
    assert_one_line_cli_error(main, [str(root), "--wandb-mode", "disabled"], capsys,
                              "scaling-analyze", ["no run has finished yet", "2 unfinished"],
                              tmp_path)
