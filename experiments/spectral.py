"""`scaling-spectral`: top singular values of finished runs, as a table (CSV and printed) and a
PNG.

    scaling-spectral RUN_A RUN_B        # matrix by matrix: σ_max of each run and the ratio B/A
    scaling-spectral --sweep SWEEP_DIR  # σ_max per role across widths, per weight-decay exponent

Errors (a missing or unfinished run, an empty sweep) are one line on stderr and exit code 2,
with nothing written.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import NoReturn

from experiments.analyze import write_csv_atomic
from experiments.cli import OneLineParser, fail
from scaling.config import ConfigError
from scaling.files import write_json_atomic
from scaling.spectral_report import (
    compare_runs,
    format_comparison,
    format_sweep,
    load_run,
    plot_comparison,
    plot_sweep,
    sweep_report,
    sweep_rows,
)

PROG = "scaling-spectral"


def _fail(message: str) -> NoReturn:
    fail(PROG, message)



def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description="Top singular value of every matrix of finished runs "
                     "(their spectral.jsonl, else their last checkpoint by power iteration).")
    parser.add_argument("runs", nargs="*", type=Path, metavar="RUN",
                        help="two run directories to compare matrix by matrix (A, then B)")
    parser.add_argument("--sweep", type=Path, metavar="SWEEP_DIR",
                        help="a width sweep (e.g. +experiment=wd_exponent): σ per role across "
                        "widths for each weight-decay exponent")
    parser.add_argument("--out", type=Path, help="output folder (default: RUN_B/spectral, or "
                        "SWEEP_DIR/analysis)")
    return parser


def _compare(run_a: Path, run_b: Path, out: Path | None) -> list[Path]:
    a, b = load_run(run_a, "RUN_A"), load_run(run_b, "RUN_B")
    rows = compare_runs(a, b)
    out = out or run_b / "spectral"
    label_a, label_b = f"{a.run_dir.name} ({a.source})", f"{b.run_dir.name} ({b.source})"
    print(format_comparison(rows, label_a, label_b))
    write_csv_atomic(out / "compare.csv", rows)
    return [out / "compare.csv", plot_comparison(rows, a.run_dir.name, b.run_dir.name,
                                                 out / "compare.png")]


def _sweep(sweep_dir: Path, out: Path | None) -> list[Path]:
    report = sweep_report(sweep_dir)
    out = out or sweep_dir / "analysis"
    print(format_sweep(report))
    write_json_atomic(out / "spectral_sweep.json", report)  # creates `out`
    write_csv_atomic(out / "spectral_sweep.csv", sweep_rows(report))
    return [out / "spectral_sweep.json", out / "spectral_sweep.csv",
            plot_sweep(report, out / "spectral_sweep.png")]


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if (args.sweep is None) == (len(args.runs) == 0):
        _fail("expected two run directories RUN_A RUN_B, or --sweep SWEEP_DIR (not both)")
    if args.sweep is None and len(args.runs) != 2:
        _fail(f"runs={[str(r) for r in args.runs]}: expected two run directories, A and B")
    try:
        files = (_sweep(args.sweep, args.out) if args.sweep is not None
                 else _compare(*args.runs, args.out))
    except ConfigError as error:
        _fail(str(error))
    for path in files:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
