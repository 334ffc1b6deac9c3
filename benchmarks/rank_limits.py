"""The rank diagnostics of a width sweep: how much of a full-rank orthogonal factor each matrix's
direction fills, and the layer-0 attention Z, against width.

Reads every finished run under the given folders (their `metrics.jsonl`), averages the
`orth_rank/...` and `attn_z/0` indicators over the logged steps from --from-step on, and prints
one row per (folder, width): the rank fraction ‖O‖_F²/min(fan_in, fan_out) of each layer-0
projection, its mean over the other matrices, the implied ‖O‖_F² of layer 0's query projection
(rank fraction × width: the number of directions the step is spread over), and attention Z.

    python benchmarks/rank_limits.py runs/diag runs/diag_bpe
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from scaling.files import read_jsonl

LAYER0 = ("wq", "wk", "wv", "wo", "w_up", "w_down")


def run_rows(folder: Path, from_step: int) -> list[dict]:
    """One row per finished run: its width and the indicators' means over the logged steps."""
    rows = []
    for result_file in sorted(folder.rglob("result.json")):
        config = json.loads(result_file.read_text())["config"]
        records = [r for r in read_jsonl(result_file.parent / "metrics.jsonl")
                   if r.get("step", 0) >= from_step and "attn_z/0" in r]
        if not records:
            continue
        mean = {k: statistics.fmean(r[k] for r in records) for k in records[0]
                if k.startswith(("orth_rank/", "attn_z/"))}
        rows.append({"width": config["model"]["width"], "lr": config["optim"]["lr"], **mean})
    return rows


def table(folders: list[Path], from_step: int) -> str:
    head = (f"{'folder':<18} {'width':>5} " + " ".join(f"{n + '/0':>8}" for n in LAYER0)
            + f" {'rest':>6} {'‖O‖²(wq0)':>10} {'attn_z/0':>9}")
    lines = [head]
    for folder in folders:
        by_width = defaultdict(list)
        for row in run_rows(folder, from_step):
            by_width[row["width"]].append(row)
        for width, rows in sorted(by_width.items()):
            row = {k: statistics.fmean(r[k] for r in rows if k in r) for k in rows[0]}
            layer0 = [row.get(f"orth_rank/blocks/{n}/0", float("nan")) for n in LAYER0]
            rest = [v for k, v in row.items() if k.startswith("orth_rank/")
                    and not k.endswith("/0")]
            lines.append(f"{folder.name:<18} {width:>5} " + " ".join(f"{v:>8.3f}" for v in layer0)
                         + f" {statistics.fmean(rest) if rest else float('nan'):>6.3f}"
                         + f" {layer0[0] * width:>10.1f} {row.get('attn_z/0', float('nan')):>9.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="sweep folders of finished runs")
    parser.add_argument("--from-step", type=int, default=50,
                        help="average the indicators logged from this step on (default 50)")
    args = parser.parse_args(argv)
    print(table(args.folders, args.from_step))


if __name__ == "__main__":
    main()
