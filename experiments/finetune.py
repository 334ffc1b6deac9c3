"""`scaling-finetune`: a finished run's weights trained further, with any optimizer, on other data.

The source is `init.from_run`, or else the `pretrain` run (scaling-train's overrides, half_a of
the standard library by default, plus the command line's model, param and logging overrides),
trained first unless it has finished. The fine-tune's model and
param groups are the source's: those the command line sets must equal them. The fine-tune is an
ordinary run directory (resumable, result.json) that also records the pretrained weights'
validation loss on its data at step 0, and draws its loss curve to loss_curve.png. Every command
line is checked, both runs' configs and data included, before anything is written.
"""

from __future__ import annotations

import copy
import hashlib
import math
from pathlib import Path
from typing import NamedTuple

import hydra
from hydra.core.hydra_config import HydraConfig
from matplotlib.figure import Figure
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
from scaling.config import RunConfig, from_dict, to_dict
from scaling.files import atomic_open, read_jsonl
from scaling.training.pretrained import SOURCE_GROUPS, check_compatible, source_result
from scaling.training.rundir import run_name

PROG = "scaling-finetune"
CONFIG_NAME = "finetune"
FIGURE = "loss_curve.png"
OPTION_FIELDS = {"model": "kind", "param": "name"}  # the field a group's option (model=mlp) sets
PASSED_ON = (*SOURCE_GROUPS, "logging")  # command-line groups the pretrained source takes too
USAGE = f"usage: {PROG} [-m] [GROUP=OPTION ...] [GROUP.FIELD=VALUE ...]"
ABOUT = """\
Fine-tunes a finished run's weights with any optimizer (default MeZO) on other data (default: the
half of the standard library's packages the source did not see). Without init.from_run, the source
is first pretrained by `scaling-train` with the `pretrain` overrides (default: AdamW on data=half_a),
or found finished. The model and param groups come from the source; a value given for them must
equal the source's. The fine-tune is an ordinary run directory under train.out_dir (metrics.jsonl,
checkpoints, result.json; the same command resumes or reports it) that also holds the pretrained
weights' validation loss at step 0 (start_val_loss) and loss_curve.png."""
MAIN_FIELDS = {
    "init.from_run": "a finished run's directory; null: the `pretrain` run, trained if needed",
    "pretrain": "scaling-train's overrides for that run, e.g. \"pretrain=['data=half_a']\"",
    "optim": "the fine-tune's optimizer (optim=NAME), e.g. mezo (default), adamw, sgd, muon",
    "optim.lr": "its learning rate",
    "data": "half_b (default), half_a or default (all); data=default data.path=... for your text",
    "train.steps": "fine-tuning steps",
    "train.out_dir": "folder of the fine-tune runs (the pretrained source: OUT_DIR/pretrain)",
    "sweep.log2_lr_min": "an LR grid of fine-tunes, as for scaling-train",
    "model.compute_dtype": "numerics may differ from the source's; other model fields may not",
}
EXAMPLES = f"""\
  {PROG}                                  pretrain on half_a if needed, MeZO on half_b
  {PROG} optim=adamw optim.lr=1e-3        the same source, fine-tuned with AdamW
  {PROG} init.from_run=runs/RUN_DIR       a run of yours (its model and param are used)
  {PROG} -m optim=mezo,sgd                one fine-tune per optimizer"""
OTHER_FLAGS = """\
  --cfg job     print the composed config, every field, and exit
  --hydra-help  Hydra's own help and flags"""


def help_text() -> str:
    fields = [f"  {field:<20} {meaning}" for field, meaning in MAIN_FIELDS.items()]
    optimizers = ", ".join(group_options("optim"))
    return "\n".join([USAGE, "", ABOUT, "", "main fields (GROUP.FIELD=VALUE):", *fields,
                      f"optimizers (optim=NAME): {optimizers}", "examples:", EXAMPLES,
                      "other flags:", OTHER_FLAGS])


class Plan(NamedTuple):
    finetune: RunConfig
    pretrain: RunConfig | None  # the source to train first; None when init.from_run is given
    pretrain_overrides: list[str]  # scaling-train's command line for it


def plan(values: dict, overrides: list[str]) -> Plan:
    """The fine-tune (model and param from its source) and the source run to pretrain, from a
    composed finetune config and the command line's overrides."""
    values = copy.deepcopy(values)
    parsed = parse_overrides(overrides)
    pretrain_list = with_pretrain_defaults(values.pop("pretrain"), parsed)
    to_run_config(values)  # the command line's own mistakes first, named as given
    given = [o for o in parsed if o.key_or_group.split(".")[0] in SOURCE_GROUPS]
    pretrain, pretrain_overrides = None, []
    if values["init"]["from_run"] is None:
        passed_on = [o.input_line for o in parsed if o.key_or_group.split(".")[0] in PASSED_ON]
        pretrain_overrides = [*passed_on, *pretrain_list]
        try:
            pretrain = to_run_config(compose_or_explain(pretrain_overrides, "config"))
        except ConfigError as error:
            raise ConfigError("pretrain", pretrain_list,
                              f"scaling-train overrides of a valid run ({error})") from None
        values["init"]["from_run"] = str(Path(pretrain.train.out_dir) / run_name(pretrain))
        source = to_dict(pretrain)
    else:
        source = source_result(values["init"]["from_run"])["config"]
    for group in SOURCE_GROUPS:  # the source's values, but for those the command line sets
        named = {o.key_or_group.partition(".")[2] or OPTION_FIELDS[group] for o in given
                 if o.key_or_group.split(".")[0] == group}
        values[group] = source[group] | {f: values[group][f] for f in named if f in values[group]}
    finetune = to_run_config(values)
    check_compatible(finetune, from_dict(source))
    return Plan(finetune, pretrain, pretrain_overrides)


def with_pretrain_defaults(pretrain: list[str], parsed: list) -> list[str]:
    """A command line's `pretrain=[...]` added to the config's own list rather than replacing
    it: its defaults stay but for the keys the given list sets (so train.out_dir=.../pretrain
    stays unless the list moves it)."""
    if not any(o.key_or_group == "pretrain" for o in parsed):
        return pretrain
    others = [o.input_line for o in parsed if o.key_or_group != "pretrain"]
    defaults = compose_or_explain(others, CONFIG_NAME)["pretrain"]
    named = {o.key_or_group for o in parse_overrides(pretrain)}
    kept = [o.input_line for o in parse_overrides(defaults) if o.key_or_group not in named]
    return [*kept, *pretrain]


def precheck(argv: list[str]) -> list[str]:
    """Composes every fine-tune the command line asks for, with its source, and reads their data;
    returns argv for Hydra (a multirun gets a W&B group named after the command)."""
    if any(a in INFO_FLAGS or a.split("=")[0] in INFO_FLAGS for a in argv):
        return argv
    overrides, multirun, _ = split_command(argv)
    for o in parse_overrides(overrides):
        options = group_options(o.key_or_group)
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.value()]
        if options is not None and not o.is_delete() and not set(values) <= set(options):
            bad = next(v for v in values if v not in options)
            raise ConfigError(o.key_or_group, bad, f"one of {options}")
    points = sweep_points(overrides, CONFIG_NAME)
    if len(points) > 1 and not multirun:
        raise ConfigError("overrides", " ".join(overrides),
                          "a single value per key, or -m (--multirun) to sweep")
    from scaling.training import data  # numpy only

    checked = set()
    for point in points:
        finetune, pretrain, _ = plan(compose_or_explain(point, CONFIG_NAME), point)
        for cfg in (finetune, pretrain):
            if cfg is not None and (cfg.data, cfg.train.seq_len) not in checked:
                data.load(cfg.data, cfg.train.seq_len)
                checked.add((cfg.data, cfg.train.seq_len))
    if multirun and not any(o.lstrip("+").startswith("logging.group=") for o in overrides):
        digest = hashlib.sha256(" ".join(sorted(overrides)).encode()).hexdigest()[:8]
        argv = [*argv, f"logging.group=finetune-{digest}"]
    return argv


@hydra.main(config_path="pkg://configs", config_name=CONFIG_NAME, version_base="1.3")
def _run(cfg: DictConfig) -> None:
    # after validation: importing jax is the slow part
    from scaling.training.loop import finished_result, member_config, sweep_lrs, train, train_sweep

    values = OmegaConf.to_container(cfg, resolve=True)
    try:
        finetune, pretrain, pretrain_overrides = plan(values, list(HydraConfig.get().overrides.task))
        if pretrain is not None:
            done = finished_result(pretrain) is not None
            if not done:
                print(f"pretraining the source: scaling-train {' '.join(pretrain_overrides)}",
                      flush=True)
            print(_source_line(train(pretrain), done), flush=True)
        finished = {r["run_dir"] for lr in sweep_lrs(finetune)
                    if (r := finished_result(member_config(finetune, lr)))}
        results = train_sweep(finetune)
    except ConfigError as error:
        fail(PROG, error)
    for result in results:  # one per LR when sweep.log2_lr_min/max define a grid
        figure = plot_curve(Path(result["run_dir"]))
        print(report_line(result, result["run_dir"] in finished, figure))


def _source_line(result: dict, already_finished: bool) -> str:
    done = "already finished, not retrained: " if already_finished else ""
    return (f"source {result['run_dir']}: {done}val_loss={result['val_loss']} after "
            f"{result['steps']} steps on its own data, {result['data']}")


def report_line(result: dict, already_finished: bool, figure: Path) -> str:
    """Where fine-tuning started and ended: the held-out loss of the pretrained weights on the
    new data, and of the fine-tuned ones."""
    done = "already finished, not retrained: " if already_finished else ""
    config = result["config"]
    what = (f"fine-tuning {Path(config['init']['from_run']).name} with {config['optim']['name']} "
            f"lr={config['optim']['lr']:g}")
    start, end = result["start_val_loss"], result["val_loss"]
    if result["diverged"]:
        outcome = f"diverged by step {result['steps']} (val_loss {start:.4f} at step 0)"
    else:
        verb = "lowered" if end < start else "raised" if end > start else "kept"
        outcome = (f"{verb} the held-out loss from {start:.4f} (step 0, the pretrained weights) "
                   f"to {end:.4f} (step {result['steps']}): {end - start:+.4f}")
    return (f"{result['run_dir']}: {done}{what} {outcome}; train_loss={result['train_loss']}, "
            f"wall={result['wall_seconds']:.1f}s; curve: {figure}")


def plot_curve(run_dir: Path) -> Path:
    """The fine-tune's validation loss (top; its start marked: the pretrained weights on this
    data, step 0) and training loss (bottom) against step. Apart, since the training loss's
    batch noise would hide the validation loss's change."""
    records = read_jsonl(run_dir / "metrics.jsonl")
    finite = lambda key: [(r["step"], r[key]) for r in records
                          if r.get(key) is not None and math.isfinite(r[key])]
    train, val = finite("train_loss"), finite("val_loss")
    fig = Figure(figsize=(7, 6))
    val_ax, train_ax = fig.subplots(2, 1, sharex=True)
    if val:
        val_ax.plot(*zip(*val, strict=True), "o-", color="C1", ms=4, label="validation loss")
    start = next((loss for step, loss in val if step == 0), None)
    if start is not None:
        val_ax.axhline(start, color="0.5", ls="--", lw=1)
        val_ax.plot([0], [start], "*", color="C3", ms=15, ls="none",
                    label=f"start: the pretrained weights, {start:.4f}")
    if train:
        train_ax.plot(*zip(*train, strict=True), color="C0", lw=1,
                      label="training loss (mean over each log window)")
    val_ax.set(ylabel="loss (nats per token)", title=run_dir.name)
    train_ax.set(xlabel="fine-tuning step", ylabel="loss (nats per token)")
    for ax in (val_ax, train_ax):
        ax.legend()
    path = run_dir / FIGURE
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120, bbox_inches="tight")
    return path


def main(argv: list[str] | None = None) -> None:
    run_command(PROG, argv, help_text, precheck, _run)


if __name__ == "__main__":
    main()
