"""`scaling-coord-check`: the coordinate check of any model, optimizer and parametrizations.

Composes configs/coord_check.yaml (scaling-train's groups plus `coord`), measures the RMS of every
module output and parameter update at steps 0..coord.steps on one fixed batch, across
coord.widths (and coord.depths), fits each one's log-log slope, and writes per step a figure
(RMS against width, a column per parametrization) and the slope table (CSV and markdown), to
coord.out_dir/<check name>/ and to W&B. With coord.check=true it exits 1 when a slope that must
be flat is beyond coord.tolerance. Every command line is validated before anything is compiled.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import hashlib
import io
import json
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from experiments.cli import fail, run_command
from experiments.compose import (
    INFO_FLAGS,
    ConfigError,
    compose_or_explain,
    group_options,
    parse_overrides,
    split_command,
    sweep_points,
    to_run_config,
)
from scaling.config import RunConfig, to_dict, validate
from scaling.coord_check import (
    DEPTH,
    WIDTH,
    CoordConfig,
    Slope,
    coord_config,
    failures,
    markdown_table,
    verdict,
    what_is_checked,
)

PROG = "scaling-coord-check"
CONFIG_NAME = "coord_check"
TRAIN_FROM_COORD = ("steps", "batch_size", "seq_len", "out_dir")  # train.X is ${coord.X}
USAGE = f"usage: {PROG} [-m] [GROUP=OPTION ...] [coord.FIELD=VALUE ...] [GROUP.FIELD=VALUE ...]"
ABOUT = """\
Coordinate check: trains each parametrization of coord.params for coord.steps steps on one fixed
batch at every width of coord.widths (and depth of coord.depths), and measures the RMS of every
module output and of every parameter's update (θ_t − θ_{t−1}, per layer) at each step, averaged
over coord.seeds initializations. Writes per step a log-log figure of RMS against width (a column
per parametrization), the fitted slope of log2 RMS against log2 width of every quantity (a
table: CSV, markdown, printed), and logs both to W&B. Under μP (and the tables built on it) the
module outputs must be flat in width; under depth_mup and completep the residual stream must be
flat in depth too. coord.check=true exits 1 when a slope that must be flat is beyond
coord.tolerance."""
MAIN_FIELDS = {
    "coord.widths": "widths compared, e.g. [64,128,256,512]; null: no check across width",
    "coord.depths": "depths compared at model.width, e.g. [2,4,8,16]; null (default): none",
    "coord.params": "parametrizations side by side, default [sp,mup]",
    "coord.steps": "optimizer steps after init (default 3)",
    "coord.seeds": "initializations averaged (default 3)",
    "coord.tolerance": "largest |slope| counted as flat (default 0.125: 1.3x over 8x width)",
    "coord.check": "true: exit 1 when a slope that must be flat is beyond the tolerance",
    "coord.require_flat": "which must be flat (default: those whose rule claims it, not sp)",
    "coord.out_dir": "folder of the checks' output folders",
    "model": "transformer (default) or mlp; model.readout_init=zero|normal",
    "optim": "any optimizer (optim=NAME), at a constant LR optim.lr",
    "param.base_width": "the width at which μP equals SP",
    "logging.wandb_mode": "offline, online or disabled (default: $WANDB_MODE, else offline)",
}
EXAMPLES = f"""\
  {PROG} coord.check=true                          SP and μP Transformers, widths 64-512
  {PROG} model=mlp optim=muon                      the byte MLP under Muon
  {PROG} coord.params=[mup] model.readout_init=zero coord.check=true
  {PROG} coord.widths=null coord.depths=[2,4,8,16] coord.params=[mup,depth_mup,completep] \\
      model.width=64 param.base_width=64"""
OTHER_FLAGS = """\
  --cfg job     print the composed config, every field, and exit
  --hydra-help  Hydra's own help and flags"""


def help_text() -> str:
    fields = [f"  {field:<18} {meaning}" for field, meaning in MAIN_FIELDS.items()]
    return "\n".join([USAGE, "", ABOUT, "", "main fields:", *fields, "examples:", EXAMPLES,
                      "other flags:", OTHER_FLAGS])


def _param_chosen(overrides: list[str]) -> str | None:
    """The command line's choice of param or param.name, which coord.params replaces."""
    for o in parse_overrides(overrides):
        if o.key_or_group in ("param", "param.name"):
            return o.input_line
    return None


def plan(values: dict) -> tuple[RunConfig, CoordConfig]:
    """The run config every measurement starts from and the check's own fields, from a composed
    coord_check config; every parametrization at every width and depth is validated."""
    values = copy.deepcopy(values)
    coord = coord_config(values.pop("coord"))
    cfg = to_run_config(values)
    for field in TRAIN_FROM_COORD:
        if getattr(cfg.train, field) != getattr(coord, field):
            raise ConfigError(f"train.{field}", getattr(cfg.train, field),
                              f"coord.{field}={getattr(coord, field)!r} ({PROG} sets it "
                              f"through coord.{field})")
    for param in coord.params:
        at = dataclasses.replace(cfg, param=dataclasses.replace(cfg.param, name=param))
        for field, axis_values in (("width", coord.widths), ("depth", coord.depths)):
            for value in axis_values or ():
                shape = dataclasses.replace(cfg.model, **{field: value})
                try:
                    validate(dataclasses.replace(at, model=shape))
                except ConfigError as error:
                    if error.field == f"model.{field}":
                        raise ConfigError(f"coord.{field}s", list(axis_values),
                                          f"values each valid as model.{field} ({error})"
                                          ) from None
                    raise ConfigError("coord.params", list(coord.params),
                                      f"parametrizations valid for this model ({error})"
                                      ) from None
    return cfg, coord


def precheck(argv: list[str]) -> list[str]:
    """Composes and validates every check the command line asks for; returns argv for Hydra."""
    if any(a in INFO_FLAGS or a.split("=")[0] in INFO_FLAGS for a in argv):
        return argv
    overrides, multirun, _ = split_command(argv)
    if (chosen := _param_chosen(overrides)) is not None:
        key, _, value = chosen.partition("=")
        raise ConfigError(key, value, "coord.params=[...] (the parametrizations compared side "
                                      "by side); param.base_width and param.base_depth set "
                                      "the base shape")
    for o in parse_overrides(overrides):
        options = group_options(o.key_or_group)
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.value()]
        if options is not None and not o.is_delete() and not set(values) <= set(options):
            raise ConfigError(o.key_or_group, next(v for v in values if v not in options),
                              f"one of {options}")
    points = sweep_points(overrides, CONFIG_NAME)
    if len(points) > 1 and not multirun:
        raise ConfigError("overrides", " ".join(overrides),
                          "a single value per key, or -m (--multirun) to sweep")
    from scaling.training import data  # numpy only

    for point in points:
        cfg, coord = plan(compose_or_explain(point, CONFIG_NAME))
        data.load(cfg.data, coord.seq_len)
    return argv


def check_name(cfg: RunConfig, coord: CoordConfig) -> str:
    """The output folder's name: what is checked, and a hash of everything measured."""
    values = to_dict(cfg)
    values.pop("logging")
    values.pop("mesh")  # where it runs, not what it measures
    values["train"].pop("out_dir")
    measured = {"run": values, "coord": dataclasses.asdict(coord) | {"check": None,
                                                                      "out_dir": None}}
    digest = hashlib.sha256(json.dumps(measured, sort_keys=True).encode()).hexdigest()[:8]
    return (f"coord-{cfg.model.label}-{cfg.model.readout_init}-{cfg.optim.name}"
            f"-lr{cfg.optim.lr:g}-{digest}")


def csv_text(rows: list[Slope], tolerance: float) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["axis", "param", "step", "quantity", "slope", "checked", "within_tolerance"])
    for r in rows:
        writer.writerow([r.axis, r.param, r.step, r.quantity, f"{r.slope:.4f}", r.required,
                         r.within(tolerance)])
    return out.getvalue()


def run_check(cfg: RunConfig, coord: CoordConfig) -> tuple[Path, list[Slope]]:
    """Measures, writes the figures, tables and stats.json, and logs them to W&B; returns the
    output folder and every slope."""
    from scaling.coord_check import coordinate_check, depth_check, readout_warnings, slope_rows
    from scaling.coord_plots import save_png, step_figure
    from scaling.files import atomic_open, write_json_atomic
    from scaling.training import data

    splits = data.load(cfg.data, coord.seq_len)
    batch = data.train_batch(splits.train, cfg.train.seed, 0, coord.batch_size, coord.seq_len)
    out = Path(coord.out_dir) / check_name(cfg, coord)
    setup = (f"{cfg.optim.name} lr {cfg.optim.lr:g}, readout {cfg.model.readout_init}, "
             f"{coord.seeds} seeds")
    stats, rows, figures = {}, [], []
    for axis, values, measure in ((WIDTH, coord.widths, coordinate_check),
                                  (DEPTH, coord.depths, depth_check)):
        if values is None:
            continue
        stats[axis] = {}
        for param in coord.params:
            print(f"{PROG}: {param} across {axis} {', '.join(map(str, values))}", flush=True)
            stats[axis][param] = measure(
                cfg.model, dataclasses.replace(cfg.param, name=param), cfg.optim, list(values),
                coord.steps, batch, vocab_size=splits.vocab_size, seed=cfg.train.seed,
                seeds=coord.seeds)
        axis_rows = slope_rows(stats[axis], axis, cfg.model.readout_init, coord.flat_in(axis))
        if axis == WIDTH:
            for warning in readout_warnings(stats[axis]):
                print(f"{PROG}: warning: {warning}", flush=True)
        rows += axis_rows
        shape = (f"depth {cfg.model.depth}" if axis == WIDTH else f"width {cfg.model.width}")
        title = f"{cfg.model.label} at {shape}, {setup}"
        for step in range(coord.steps + 1):
            figure = step_figure(stats[axis], axis_rows, axis, step, title, coord.tolerance)
            figures.append(save_png(figure, out / f"{axis}_step{step}.png"))
    write_json_atomic(out / "stats.json", {"config": to_dict(cfg),
                                          "coord": dataclasses.asdict(coord), "stats": stats})
    with atomic_open(out / "slopes.csv") as f:
        f.write(csv_text(rows, coord.tolerance))
    with atomic_open(out / "slopes.md") as f:
        f.write(report(cfg, coord, rows) + "\n")
    _log_to_wandb(cfg, coord, out, figures, rows)
    return out, rows


def report(cfg: RunConfig, coord: CoordConfig, rows: list[Slope]) -> str:
    """The slope tables, what the check covers, and a verdict per parametrization and axis."""
    parts = []
    for axis in (WIDTH, DEPTH):
        if not any(r.axis == axis for r in rows):
            continue
        ran = tuple(p for p in coord.flat_in(axis) if p in coord.params)
        checked = what_is_checked(axis, cfg.model.readout_init, coord.tolerance, ran)
        parts += [markdown_table(rows, axis, coord.tolerance), "",
                  (f"Checked {checked}. Parenthesized slopes are reported, not checked; ✗ "
                   "marks a checked slope beyond the tolerance."), ""]
        parts += [f"- {verdict(rows, axis, p, coord.tolerance)}" for p in coord.params]
        parts.append("")
    return "\n".join(parts).rstrip()


def _log_to_wandb(cfg: RunConfig, coord: CoordConfig, out: Path, figures: list[Path],
                  rows: list[Slope]) -> None:
    from scaling.training.tracking import wandb_entity, wandb_mode, wandb_project

    mode = wandb_mode(cfg.logging)
    if mode == "disabled":
        return
    import wandb  # slow to import; only when logging is on

    run = wandb.init(project=wandb_project(cfg.logging), entity=wandb_entity(cfg.logging),
                     group=cfg.logging.group, name=out.name, job_type="coord_check",
                     dir=str(out), mode=mode, reinit="create_new",
                     config={"run": to_dict(cfg), "coord": dataclasses.asdict(coord)},
                     settings=wandb.Settings(silent=True, console="off"))
    table = wandb.Table(columns=["axis", "param", "step", "quantity", "slope", "checked",
                                 "within_tolerance"],
                        data=[[r.axis, r.param, r.step, r.quantity, r.slope, r.required,
                               r.within(coord.tolerance)] for r in rows])
    run.log({"slopes": table, **{f"coord/{p.stem}": wandb.Image(str(p)) for p in figures}})
    run.summary.update({"failed_slopes": len(failures(rows, coord.tolerance))})
    run.finish()


@hydra.main(config_path="pkg://configs", config_name=CONFIG_NAME, version_base="1.3")
def _run(cfg: DictConfig) -> None:
    try:
        run_cfg, coord = plan(OmegaConf.to_container(cfg, resolve=True))
    except ConfigError as error:
        fail(PROG, error)
    out, rows = run_check(run_cfg, coord)
    print(report(run_cfg, coord, rows))
    failed = failures(rows, coord.tolerance)
    print(f"{PROG}: figures and tables in {out}")
    if coord.check and failed:
        print(f"{PROG}: check failed: {len(failed)} slopes that must be flat are beyond "
              f"±{coord.tolerance:g}: " + ", ".join(
                  f"{r.param} {r.quantity} step {r.step} ({r.slope:+.2f})" for r in failed[:8])
              + (" ..." if len(failed) > 8 else ""), file=sys.stderr)
        sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    run_command(PROG, argv, help_text, precheck, _run)


if __name__ == "__main__":
    main()
