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
from scaling.config import RunConfig

MODES = {False: "demo", True: "demo_quick"}
TARGET_WIDTH_MULT = 4  # the target is this much wider than the widest proxy
# The verdict's thresholds on |slope|, the optimum's drift in octaves per width doubling: they
# read the same over one doubling (--quick) or several. μP predicts 0; SP under Adam −1 (η ∝ 1/m).
STAYS_PUT = 0.5  # at most this: nearer μP's 0 than SP's 1
MOVES = 0.75  # at least this: most of SP's octave, beyond an optimum's 0.1–0.2 octave seed spread


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scaling-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the short version (about a minute on 2 idle CPU cores)")
    parser.add_argument("--wandb-mode", choices=("offline", "online", "disabled"),
                        help="default: $WANDB_MODE, else offline")
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
        per_doubling = "octave per width doubling"
        transfers = abs(drift["mup"]["slope"]) <= STAYS_PUT
        sp_moves = abs(drift["sp"]["slope"]) >= MOVES or not wider["sp"]["holds"]
        mup_says = (f"stays put (≤ {STAYS_PUT} {per_doubling})" if transfers
                    else f"moves by more than {STAYS_PUT} {per_doubling}")
        sp_says = (f"moves (≥ {MOVES} {per_doubling}) or wider gets worse" if sp_moves
                   else f"does not move by {MOVES} {per_doubling} here")
        lines.append(f"μP's optimum {mup_says}; SP's {sp_says}")
        if targets.get("mup") and targets.get("sp") and not targets["mup"]["diverged"]:
            sp_loss = targets["sp"]["val_loss"]
            better = targets["sp"]["diverged"] or targets["mup"]["val_loss"] < sp_loss
            lines.append("at the target width, μP's transferred LR "
                         + ("beats" if better else "does not beat") + " SP's")
    return lines


def on_terminal() -> bool:
    """Progress bars only on a terminal: nested bars move the cursor with escape codes, which a
    log file or a pipe keeps as garbage."""
    return sys.stderr.isatty()


def sweep_proxies(jobs: list[RunConfig]) -> None:
    """Trains each job's LR grid: nested bars on a terminal, else a plain line per job done."""
    from scaling.training.loop import train_sweep

    if on_terminal():
        for cfg in tqdm(jobs, unit="job", dynamic_ncols=True):
            train_sweep(cfg)
        return
    started = time.perf_counter()
    for i, cfg in enumerate(jobs, 1):
        train_sweep(dataclasses.replace(cfg, logging=dataclasses.replace(cfg.logging,
                                                                         progress=False)))
        print(f"proxy job {i}/{len(jobs)} done: {cfg.param.name} w{cfg.model.width} "
              f"seed {cfg.train.seed} ({time.perf_counter() - started:.0f} s)", file=sys.stderr,
              flush=True)


def analyse(sweep_dir: Path, *, project: str | None,
            mode: str | None) -> tuple[dict, list[Path]]:
    """The proxy sweep's analysis and the files scaling-analyze writes for it (in its analysis/)."""
    from experiments.analyze import write_analysis
    from scaling.analysis import analyze, format_table, load_results

    analysis = analyze(load_results(sweep_dir))
    files, _ = write_analysis(analysis, sweep_dir / "analysis", project=project, mode=mode)
    print(format_table(analysis))
    return analysis, files


def train_targets(sweep_dir: Path, out_dir: Path, width: int) -> dict[str, dict]:
    """Each parametrization's proxy optimum transferred to `width` and trained, by param."""
    from scaling.training.loop import train

    targets = {}
    for param in ("sp", "mup"):
        shape, result = plan(sweep_dir, width=width, param=param)
        target = dataclasses.replace(result.config, train=dataclasses.replace(
            result.config.train, out_dir=str(out_dir / "target")),
            logging=dataclasses.replace(result.config.logging, progress=on_terminal()))
        write_overrides(out_dir / f"transfer-{param}.yaml", command_overrides(target),
                        result.reasons)
        print(explain(shape, result))
        targets[param] = train(target)
    return targets


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    from scaling.training.files import write_json_atomic

    experiment = MODES[args.quick]
    mode = [f"logging.wandb_mode={args.wandb_mode}"] if args.wandb_mode else []
    extra = [*args.overrides, *mode, f"logging.group=scaling-demo-{experiment}"]
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
    sweep_proxies(jobs)
    print(f"[2/4] analysis of {sweep_dir}")
    analysis, files = analyse(sweep_dir, project=jobs[0].logging.project, mode=args.wandb_mode)
    print(f"[3/4] transfer to width {target_width} and train the targets")
    targets = train_targets(sweep_dir, out_dir, target_width)

    print("[4/4] verdict")
    lines = verdict(analysis, targets)
    print("\n".join(lines))
    write_json_atomic(out_dir / "verdict.json", {
        "verdict": lines, "targets": targets, "drift": analysis["drift"],
        "wider_is_better": analysis["wider_is_better"],
        "wall_seconds": time.perf_counter() - started})
    print(f"analysis: {', '.join(str(p) for p in files)}\nverdict: {out_dir / 'verdict.json'}")


if __name__ == "__main__":
    main()
