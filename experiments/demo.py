"""`scaling-demo`: the whole story on the embedded corpus, proxy → transfer → target, SP vs μP.

1. sweep the proxy (experiment `demo`, or `demo_quick` with --quick): LR grid × widths × seeds,
   under SP and μP; 2. analyse it (tables, plots, W&B analysis run); 3. transfer each
parametrization's proxy optimum to a wider target and train it; 4. print the verdict.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from experiments.compose import ConfigError, compose_or_explain, sweep_points, to_run_config
from experiments.transfer import command_overrides, explain, plan, write_overrides

MODES = {False: "demo", True: "demo_quick"}
TARGET_WIDTH_MULT = 4  # the target is this much wider than the widest proxy


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scaling-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the short version (~2 minutes)")
    parser.add_argument("--wandb-mode", choices=("offline", "online", "disabled"),
                        default="offline")
    parser.add_argument("--out-dir", type=Path, help="default: runs/demo (runs/demo_quick)")
    parser.add_argument("--target-width", type=int, help="default: 4× the widest proxy width")
    parser.add_argument("overrides", nargs="*",
                        help="Hydra overrides for the proxy sweep, e.g. train.steps=300")
    return parser


def proxy_configs(experiment: str, extra: list[str]) -> list:
    """One config per job of the experiment's sweep (each trains the whole LR grid)."""
    overrides = [f"+experiment={experiment}", *extra]
    return [to_run_config(compose_or_explain(point, "config")) for point in sweep_points(overrides)]


def verdict(analysis: dict, targets: dict[str, dict]) -> list[str]:
    """What the runs say, in words: drift per parametrization, wider-is-better, target losses."""
    drift = {d["family"]["param"]: d for d in analysis["drift"]}
    wider = {w["family"]["param"]: w for w in analysis["wider_is_better"]}
    lines = []
    for param in ("mup", "sp"):
        if param not in drift:
            continue
        d, w = drift[param], wider[param]
        spread = "?" if d["drift_uncertainty"] is None else f"{d['drift_uncertainty']:.2f}"
        noise = "unknown with one seed" if w["noise"] is None else f"{w['noise']:.3f}"
        lines.append(
            f"{param:>4}: optimum drift over widths {d['widths'][0]}→{d['widths'][-1]}: "
            f"{d['drift_octaves']:.2f} ± {spread} octaves (slope {d['slope']:+.2f} per width "
            f"doubling){' [an optimum is on the grid edge]' if d['any_on_edge'] else ''}; "
            f"wider is better at the transferred LR: {'yes' if w['holds'] else 'no'}"
            f"{' beyond' if w['beyond_noise'] else ', not beyond'} the seed noise ({noise})")
    for param in ("mup", "sp"):
        if (run := targets.get(param)) is None:
            continue
        loss = "diverged" if run["diverged"] else f"val loss {run['val_loss']:.4f}"
        lines.append(f"{param:>4}: target w{run['config']['model']['width']} at the transferred "
                     f"LR {run['config']['optim']['lr']:.4g}: {loss}")
    if "mup" in drift and "sp" in drift:
        transfers = drift["mup"]["drift_octaves"] <= 1.0
        sp_moves = drift["sp"]["drift_octaves"] >= 2.0 or not wider["sp"]["holds"]
        lines.append("μP's optimum " + ("stays put (≤ 1 octave)" if transfers else
                                        "moves by more than an octave")
                     + "; SP's " + ("moves (≥ 2 octaves) or wider gets worse" if sp_moves else
                                    "does not move by 2 octaves here"))
        if targets.get("mup") and targets.get("sp") and not targets["mup"]["diverged"]:
            sp_loss = targets["sp"]["val_loss"]
            better = targets["sp"]["diverged"] or targets["mup"]["val_loss"] < sp_loss
            lines.append("at the target width, μP's transferred LR "
                         + ("beats" if better else "does not beat") + " SP's")
    return lines


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    from scaling.analysis import analyze, format_table, load_results
    from scaling.analysis_run import log_analysis
    from scaling.training.files import write_json_atomic
    from scaling.plots import plot_analysis
    from scaling.training.loop import train, train_sweep

    experiment = MODES[args.quick]
    extra = [*args.overrides, f"logging.wandb_mode={args.wandb_mode}",
             f"logging.group=scaling-demo-{experiment}"]
    if args.out_dir is not None:
        extra.append(f"train.out_dir={args.out_dir / 'proxy'}")
    try:
        jobs = proxy_configs(experiment, extra)
    except ConfigError as error:
        print(f"scaling-demo: error: {error}", file=sys.stderr)
        sys.exit(2)
    target_width = args.target_width or TARGET_WIDTH_MULT * max(c.model.width for c in jobs)
    sweep_dir = Path(jobs[0].train.out_dir)
    out_dir = sweep_dir.parent
    started = time.perf_counter()

    print(f"[1/4] proxy sweep: {len(jobs)} jobs (param × width × seed), each over the LR grid")
    for cfg in tqdm(jobs, unit="job", dynamic_ncols=True):
        train_sweep(cfg)

    print(f"[2/4] analysis of {sweep_dir}")
    analysis = analyze(load_results(sweep_dir))
    write_json_atomic(sweep_dir / "analysis" / "analysis.json", analysis)
    images = plot_analysis(analysis, sweep_dir / "analysis")
    log_analysis(analysis, images, project=jobs[0].logging.project, group=analysis["group"],
                 mode=args.wandb_mode, directory=sweep_dir / "analysis")
    print(format_table(analysis))

    print(f"[3/4] transfer to width {target_width} and train the targets")
    targets = {}
    for param in ("sp", "mup"):
        shape, result = plan(sweep_dir, width=target_width, param=param)
        target = dataclasses.replace(result.config, train=dataclasses.replace(
            result.config.train, out_dir=str(out_dir / "target")),
            logging=dataclasses.replace(result.config.logging, progress=True))
        write_overrides(out_dir / f"transfer-{param}.yaml", command_overrides(target),
                        result.reasons)
        print(explain(shape, result))
        targets[param] = train(target)

    print("[4/4] verdict")
    lines = verdict(analysis, targets)
    print("\n".join(lines))
    write_json_atomic(out_dir / "verdict.json", {
        "verdict": lines, "targets": targets, "drift": analysis["drift"],
        "wider_is_better": analysis["wider_is_better"],
        "wall_seconds": time.perf_counter() - started})
    print(f"plots: {', '.join(str(p) for p in images)}\nverdict: {out_dir / 'verdict.json'}")


if __name__ == "__main__":
    main()
