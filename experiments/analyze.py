"""`scaling-analyze SWEEP_DIR`: tables, plots and a W&B analysis run from a sweep's results; a
partial sweep (runs preempted or still going) is analysed on its finished runs and the table lists
the unfinished ones.

Errors (missing sweep, no results, bad metric) are one line on stderr and exit code 2, with
nothing written.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import NoReturn

from experiments.cli import OneLineParser, fail
from scaling.analysis import METRICS, analyze, format_table, load_results, unfinished_runs
from scaling.config import LoggingConfig
from scaling.files import atomic_open, write_json_atomic
from scaling.plots import plot_analysis
from scaling.training.analysis_run import log_analysis
from scaling.training.tracking import wandb_mode


def _fail(message: str) -> NoReturn:
    fail("scaling-analyze", message)



def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="scaling-analyze", description="Tables, plots and a W&B analysis run "
                     "from the result.json files of a sweep.")
    parser.add_argument("sweep_dir", type=Path, help="folder holding the sweep's run folders")
    parser.add_argument("--out", type=Path, help="output folder (default: SWEEP_DIR/analysis)")
    parser.add_argument("--metric", choices=METRICS, default="val_loss")
    parser.add_argument("--wandb-mode", choices=("offline", "online", "disabled"),
                        help="default: $WANDB_MODE, else offline")
    parser.add_argument("--project", help="W&B project (default: $WANDB_PROJECT, else scaling)")
    return parser


def write_csv_atomic(path: Path, rows: list[dict]) -> None:
    """One line per row under a header of the first row's keys."""
    with atomic_open(path, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows(rows)


def write_analysis(analysis: dict, out: Path, *, project: str | None,
                   mode: str | None) -> tuple[list[Path], str | None]:
    """Every output of an analysis, for scaling-analyze and scaling-demo alike: analysis.json,
    runs.csv and the plots in `out`, and the W&B analysis run. Returns (files, W&B run id)."""
    write_json_atomic(out / "analysis.json", analysis)  # creates `out`
    write_csv_atomic(out / "runs.csv", analysis["runs"])
    images = plot_analysis(analysis, out)
    run_id = log_analysis(analysis, images, project=project, group=analysis["group"], mode=mode,
                          directory=out)
    return [out / "analysis.json", out / "runs.csv", *images], run_id


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if not args.sweep_dir.is_dir():
        _fail(f"sweep_dir={str(args.sweep_dir)!r}: expected an existing folder of sweep runs")
    try:
        analysis = analyze(load_results(args.sweep_dir), metric=args.metric,
                           unfinished=unfinished_runs(args.sweep_dir))
    except (FileNotFoundError, ValueError) as error:
        _fail(str(error))
    out = args.out or args.sweep_dir / "analysis"
    files, run_id = write_analysis(analysis, out, project=args.project, mode=args.wandb_mode)
    print(format_table(analysis))
    for path in files:
        print(f"wrote {path}")
    if run_id is not None:
        mode = wandb_mode(LoggingConfig(wandb_mode=args.wandb_mode))
        print(f"W&B analysis run {run_id} ({mode}) under {out / 'wandb'}")


if __name__ == "__main__":
    main()
