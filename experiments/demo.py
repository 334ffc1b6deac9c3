"""`scaling-demo`: the whole story on the embedded corpus, proxy → transfer → target, SP vs μP
across width (or, with --axis depth, μP vs CompleteP across depth).

1. sweep the proxy (experiment `demo`, or `demo_quick` with --quick; `demo_depth`,
   `demo_depth_quick` with --axis depth): LR grid × widths (depths) × seeds, under both
   parametrizations; 2. analyse it (tables, plots, W&B analysis run); 3. transfer each
parametrization's proxy optimum to a wider (deeper) target and train it; 4. print the verdict.
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import time
from pathlib import Path
from typing import NoReturn

from hydra import compose as hydra_compose
from hydra import initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from tqdm.auto import tqdm

from experiments.compose import (
    COMPOSE_ERRORS,
    CONFIG_MODULE,
    ConfigError,
    compose_or_explain,
    sweep_points,
    to_run_config,
)
from experiments.transfer import command_overrides, explain, plan, write_overrides
from scaling import schemes
from scaling.analysis import DRIFT_KEYS
from scaling.config import RunConfig


@dataclasses.dataclass(frozen=True)
class Story:
    """What grows from proxy to target, the sweeps that show it, and who should transfer."""

    axis: str  # "width" or "depth"
    experiments: dict[bool, str]  # --quick -> experiment overlay
    scaled: str  # the parametrization whose optimum should stay put
    baseline: str  # the one without a rule for this axis, whose optimum should move


# Depth: CompleteP (α = 1) rather than Depth-μP (α = 1/2), because CompleteP is the rule that
# claims the Adam LR transfers across depth (its block LR factor r^(α−1) is 1, so μP and it differ
# only in the 1/r on every branch); Depth-μP's α = 1/2 is reported to leave Adam's optimum moving.
STORIES = {"width": Story("width", {False: "demo", True: "demo_quick"}, "mup", "sp"),
           "depth": Story("depth", {False: "demo_depth", True: "demo_depth_quick"}, "completep",
                          "mup")}
TARGET_MULT = 4  # the target is this much wider (deeper) than the widest (deepest) proxy
# The verdict's thresholds on |slope|, the optimum's drift in octaves per width (depth) doubling:
# they read the same over one doubling (--quick) or several. μP (CompleteP) predicts 0; SP under
# Adam −1 (η ∝ 1/m), and μP across depth, idealised, −1 too (L blocks' equal steps add up), though
# measured only −0.3 at depths 1→4: there deeper getting worse, not the drift, is what shows.
STAYS_PUT = 0.5  # at most this: nearer the rule's 0 than the baseline's 1
MOVES = 0.75  # at least this: most of an octave, beyond an optimum's 0.1–0.2 octave seed spread


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scaling-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="the short version (about a minute on 2 idle CPU cores, two with "
                        "--axis depth)")
    parser.add_argument("--axis", choices=tuple(STORIES), default="width",
                        help="what the target scales: width (SP vs μP, default) or depth "
                        "(μP vs CompleteP)")
    parser.add_argument("--wandb-mode", choices=("offline", "online", "disabled"),
                        help="default: $WANDB_MODE, else offline")
    parser.add_argument("--out-dir", type=Path,
                        help="default: runs/EXPERIMENT, e.g. runs/demo (runs/demo_depth_quick)")
    parser.add_argument("--target-width", type=int,
                        help="--axis width: default 4× the widest proxy width")
    parser.add_argument("--target-depth", type=int,
                        help="--axis depth: default 4× the deepest proxy depth")
    parser.add_argument("--launcher", metavar="NAME",
                        help="run the proxy sweep as `scaling-train -m hydra/launcher=NAME`, e.g. "
                        "joblib, parallel, submitit_local, slurm (docs/clusters.md)")
    parser.add_argument("--launcher-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="with --launcher: hydra.launcher.KEY=VALUE, e.g. n_jobs=2 "
                        "(repeatable)")
    parser.add_argument("overrides", nargs="*",
                        help="Hydra overrides for the proxy sweep, e.g. train.steps=300")
    return parser


def _fail(message: str) -> NoReturn:
    print(f"scaling-demo: error: {message}", file=sys.stderr)
    sys.exit(2)


def check_launcher(name: str, args: list[str]) -> list[str]:
    """The Hydra overrides that select launcher `name` with `args` (KEY=VALUE), each checked
    against the launchers and fields Hydra finds."""
    for arg in args:
        if "=" not in arg:
            _fail(f"--launcher-arg={arg}: expected KEY=VALUE, e.g. n_jobs=2")
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        options = GlobalHydra.instance().config_loader().get_group_options("hydra/launcher")
        if name not in options:
            _fail(f"--launcher={name}: expected one of {', '.join(options)} (joblib and "
                  "submitit_* come with pip install -e '.[cluster]')")
        try:
            launcher = hydra_compose("config", overrides=[f"hydra/launcher={name}"],
                                     return_hydra_config=True).hydra.launcher
        except COMPOSE_ERRORS as error:  # one of ours whose plugin is not installed
            _fail(f"--launcher={name}: expected an installed launcher plugin (pip install -e "
                  f"'.[cluster]'); {str(error).strip().splitlines()[0]}")
    for arg in args:
        if arg.partition("=")[0] not in launcher:
            _fail(f"--launcher-arg={arg}: expected a field of hydra/launcher={name}: "
                  f"{', '.join(k for k in launcher if not k.startswith('_'))}")
    return [f"hydra/launcher={name}", *(f"hydra.launcher.{arg}" for arg in args)]


def sweep_through_launcher(experiment: str, extra: list[str], launcher: list[str]) -> None:
    """Trains the proxy sweep as one `scaling-train -m` through a Hydra launcher: its jobs in
    parallel processes or on a cluster, each job's bar off so that their output stays readable."""
    command = [sys.executable, "-m", "experiments.train", "-m", f"+experiment={experiment}",
               *launcher, *extra, "logging.progress=false"]
    print("scaling-train " + " ".join(command[3:]), flush=True)  # what to run by hand
    if (code := subprocess.run(command, check=False).returncode) != 0:
        print(f"scaling-demo: error: the proxy sweep ({' '.join(launcher)}) failed with exit "
              f"code {code}", file=sys.stderr)
        sys.exit(code)


def proxy_configs(experiment: str, extra: list[str]) -> list:
    """One config per job of the experiment's sweep (each trains the whole LR grid)."""
    overrides = [f"+experiment={experiment}", *extra]
    return [to_run_config(compose_or_explain(point, "config")) for point in sweep_points(overrides)]


def verdict(analysis: dict, targets: dict[str, dict], story: Story = STORIES["width"]
            ) -> list[str]:
    """What the runs say, in words: drift per parametrization along the story's axis,
    bigger-is-better, target losses."""
    axis, sizes, letter = story.axis, f"{story.axis}s", story.axis[0]
    drift_key, bigger_key = DRIFT_KEYS[axis]
    bigger = bigger_key.split("_")[0]  # wider, deeper
    drift = {d["family"]["param"]: d for d in analysis[drift_key]}
    better = {w["family"]["param"]: w for w in analysis[bigger_key]}
    params = (story.scaled, story.baseline)
    pad = max(4, *map(len, params))
    lines = []
    for param in params:
        if param not in drift:
            continue
        d, w = drift[param], better[param]
        spread = "?" if d["drift_uncertainty"] is None else f"{d['drift_uncertainty']:.2f}"
        noise = "unknown with one seed" if w["noise"] is None else f"{w['noise']:.3f}"
        lines.append(
            f"{param:>{pad}}: optimum drift over {sizes} {d[sizes][0]}→{d[sizes][-1]}: "
            f"{d['drift_octaves']:.2f} ± {spread} octaves (slope {d['slope']:+.2f} per {axis} "
            f"doubling){' [an optimum is on the grid edge]' if d['any_on_edge'] else ''}; "
            f"{bigger} is better at the transferred LR: {'yes' if w['holds'] else 'no'}"
            f"{' beyond' if w['beyond_noise'] else ', not beyond'} the seed noise ({noise})")
    for param in params:
        if (run := targets.get(param)) is None:
            continue
        loss = "diverged" if run["diverged"] else f"val loss {run['val_loss']:.4f}"
        lines.append(f"{param:>{pad}}: target {letter}{run['config']['model'][axis]} at the "
                     f"transferred LR {run['config']['optim']['lr']:.4g}: {loss}")
    if story.scaled in drift and story.baseline in drift:
        scaled, baseline = schemes.label(story.scaled), schemes.label(story.baseline)
        per_doubling = f"octave per {axis} doubling"
        transfers = abs(drift[story.scaled]["slope"]) <= STAYS_PUT
        moves = abs(drift[story.baseline]["slope"]) >= MOVES
        scaled_says = (f"stays put (≤ {STAYS_PUT} {per_doubling})" if transfers
                       else f"moves by more than {STAYS_PUT} {per_doubling}")
        # which sign of the missing rule showed, if any: a moving optimum, or bigger getting worse
        if moves:
            baseline_says = f"moves (≥ {MOVES} {per_doubling})"
        elif not better[story.baseline]["holds"]:
            baseline_says = (f"moves by less than {MOVES} {per_doubling}, but {bigger} gets worse "
                             "at its transferred LR")
        else:
            baseline_says = f"does not move by {MOVES} {per_doubling} here, and {bigger} is better"
        lines.append(f"{scaled}'s optimum {scaled_says}; {baseline}'s {baseline_says}")
        ours, theirs = targets.get(story.scaled), targets.get(story.baseline)
        if ours and theirs and not ours["diverged"]:
            beats = theirs["diverged"] or ours["val_loss"] < theirs["val_loss"]
            lines.append(f"at the target {axis}, {scaled}'s transferred LR "
                         + ("beats" if beats else "does not beat") + f" {baseline}'s")
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
              f"d{cfg.model.depth} seed {cfg.train.seed} "
              f"({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)


def analyse(sweep_dir: Path, *, project: str | None,
            mode: str | None) -> tuple[dict, list[Path]]:
    """The proxy sweep's analysis and the files scaling-analyze writes for it (in its analysis/)."""
    from experiments.analyze import write_analysis
    from scaling.analysis import analyze, format_table, load_results

    analysis = analyze(load_results(sweep_dir))
    files, _ = write_analysis(analysis, sweep_dir / "analysis", project=project, mode=mode)
    print(format_table(analysis))
    return analysis, files


def train_targets(sweep_dir: Path, out_dir: Path, story: Story, size: int) -> dict[str, dict]:
    """Each parametrization's proxy optimum transferred to width (or depth) `size` and trained,
    by param."""
    from scaling.training.loop import train

    targets = {}
    for param in (story.baseline, story.scaled):
        shape, result = plan(sweep_dir, **{story.axis: size}, param=param)
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
    from scaling.files import write_json_atomic

    story = STORIES[args.axis]
    other = "depth" if args.axis == "width" else "width"
    if getattr(args, f"target_{other}") is not None:
        _fail(f"--target-{other}={getattr(args, f'target_{other}')}: expected --target-"
              f"{args.axis} with --axis {args.axis}")
    experiment = story.experiments[args.quick]
    mode = [f"logging.wandb_mode={args.wandb_mode}"] if args.wandb_mode else []
    extra = [*args.overrides, *mode, f"logging.group=scaling-demo-{experiment}"]
    if args.out_dir is not None:
        extra.append(f"train.out_dir={args.out_dir / 'proxy'}")
    if args.launcher_arg and args.launcher is None:
        _fail(f"--launcher-arg={args.launcher_arg[0]}: expected --launcher NAME with it")
    launcher = (None if args.launcher is None
                else check_launcher(args.launcher, args.launcher_arg))
    try:
        jobs = proxy_configs(experiment, extra)
    except ConfigError as error:
        _fail(str(error))
    target_size = (getattr(args, f"target_{args.axis}")
                   or TARGET_MULT * max(getattr(c.model, args.axis) for c in jobs))
    sweep_dir = Path(jobs[0].train.out_dir)
    out_dir = sweep_dir.parent
    started = time.perf_counter()

    print(f"[1/4] proxy sweep: {len(jobs)} jobs (param × {args.axis} × seed), each over the LR "
          "grid")
    if launcher is None:
        sweep_proxies(jobs)
    else:
        sweep_through_launcher(experiment, extra, launcher)
    print(f"[2/4] analysis of {sweep_dir}")
    analysis, files = analyse(sweep_dir, project=jobs[0].logging.project, mode=args.wandb_mode)
    print(f"[3/4] transfer to {args.axis} {target_size} and train the targets")
    targets = train_targets(sweep_dir, out_dir, story, target_size)

    print("[4/4] verdict")
    lines = verdict(analysis, targets, story)
    print("\n".join(lines))
    write_json_atomic(out_dir / "verdict.json", {
        "verdict": lines, "axis": args.axis, "targets": targets,
        **{key: analysis[key] for key in DRIFT_KEYS[args.axis]},
        "wall_seconds": time.perf_counter() - started})
    print(f"analysis: {', '.join(str(p) for p in files)}\nverdict: {out_dir / 'verdict.json'}")


if __name__ == "__main__":
    main()
