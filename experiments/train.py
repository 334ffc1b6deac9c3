"""`scaling-train`: the Hydra app for one run (or a multirun sweep) of scaling.training.loop.

Every command line is composed and validated before anything is compiled or written: each
point of a sweep, so that a typo ends the sweep before its first run. Errors are one line on
stderr (field, value, expectation) and exit code 2.
"""

from __future__ import annotations

from importlib import resources

import hydra
from omegaconf import DictConfig, OmegaConf

from experiments.cli import fail, run_command
from experiments.compose import CONFIG_MODULE, ConfigError, group_options, precheck, to_run_config
from experiments.launcher_env import apply_job_environment

OVERLAY_GROUP = "experiment"
USAGE = "usage: scaling-train [-m] [+experiment=NAME] [GROUP=OPTION ...] [GROUP.FIELD=VALUE ...]"
ABOUT = """\
Trains a language model (a Transformer or a byte MLP) under SP, μP, Depth-μP, CompleteP or HyperP
with one optimizer, from a Hydra config; with -m, a sweep of such runs. A run writes metrics.jsonl,
checkpoints, a W&B run and result.json to train.out_dir/<run name>; the same command again resumes
it, or reports it when it has finished. Every point of a sweep is checked before the first one starts."""
# The fields a first run most often sets; `--cfg job` prints them all.
MAIN_FIELDS = {
    "model.width": "hidden width, a multiple of model.head_dim",
    "model.depth": "number of blocks",
    "model.compute_dtype": "auto (bf16 on GPU/TPU), float32 or bfloat16; weights stay float32",
    "model.scan_unroll": "layers unrolled per scan iteration: true (all), 1 (a rolled loop), k",
    "param.base_width": "the width at which μP equals SP",
    "param.base_depth": "the depth at which Depth-μP and CompleteP equal μP",
    "param.output_mult": "× the logits, one of the per-role multipliers (docs/tuning.md)",
    "optim.lr": "base learning rate (each optim=NAME has its own fields: see --cfg job)",
    "optim.warmup_steps": "steps of linear warmup (default null: optim.warmup_fraction of the "
                          "steps, 0.05)",
    "train.steps": "optimizer steps",
    "train.batch_size": "sequences per step",
    "train.grad_accum": "micro-batches each step's gradient is accumulated over (a divisor)",
    "train.seq_len": "tokens per sequence",
    "train.seed": "initialization and data order",
    "train.out_dir": "folder of the run directories",
    "data.path": "a text file or folder, or a .npy/.bin of token ids (default: the stdlib source)",
    "data.tokenizer": "bytes (default), bpe (of data.vocab_size tokens), or a tokenizer.json",
    "logging.wandb_mode": "offline, online or disabled (default: $WANDB_MODE, else offline)",
    "sweep.log2_lr_min": "smallest log2 LR of a grid trained inside each job",
    "sweep.log2_lr_max": "largest log2 LR of that grid",
    "sweep.vectorize_lr": "LRs of the grid trained together in one program",
}
SWEEPS = """\
  scaling-train -m optim.lr=1e-3,3e-3 model.width=64,128    one run per combination
  scaling-train sweep.log2_lr_min=-10 sweep.log2_lr_max=-6  an LR grid inside one job"""
OTHER_FLAGS = """\
  --cfg job     print the composed config, every field, and exit
  --hydra-help  Hydra's own help and flags"""


def help_text() -> str:
    """What the command does, its config groups, main fields, sweeps and experiment overlays."""
    defaults = _default_options()
    # a group outside the defaults list (tune) is added with a `+`, like an overlay
    groups = [f"  {group if group in defaults else '+' + group:<8} "
              + ", ".join(f"{o} (default)" if o == defaults.get(group) else o for o in options)
              for group, options in _choice_groups().items()]
    fields = [f"  {field:<20} {meaning}" for field, meaning in MAIN_FIELDS.items()]
    overlays = [f"  {name:<16} {_overlay_summary(name)}" for name in group_options(OVERLAY_GROUP)]
    overlays_head = (f"experiment overlays (configs/{OVERLAY_GROUP}), added with a `+`: "
                     f"scaling-train -m +{OVERLAY_GROUP}=NAME")
    return "\n".join([
        USAGE, "", ABOUT, "", "config groups (GROUP=OPTION):", *groups,
        "main fields (GROUP.FIELD=VALUE):", *fields, "sweeps (-m, --multirun):", SWEEPS,
        overlays_head, *overlays, "other flags:", OTHER_FLAGS])


def _choice_groups() -> dict[str, list[str]]:
    """Options of each config group that has more than one (the rest are field namespaces)."""
    folders = sorted(p.name for p in resources.files(CONFIG_MODULE).iterdir() if p.is_dir())
    options = {group: group_options(group) for group in folders if group != OVERLAY_GROUP}
    return {group: names for group, names in options.items() if len(names) > 1}


def _default_options() -> dict[str, str]:
    """The option config.yaml's defaults list picks per group."""
    config = OmegaConf.create((resources.files(CONFIG_MODULE) / "config.yaml").read_text())
    return {k: v for entry in config.defaults if not isinstance(entry, str)
            for k, v in entry.items()}


def _overlay_summary(name: str) -> str:
    """An overlay file's first comment line, up to its first colon: what the experiment is."""
    text = (resources.files(CONFIG_MODULE) / OVERLAY_GROUP / f"{name}.yaml").read_text()
    comments = [line[2:] for line in text.splitlines()
                if line.startswith("# ") and "@package" not in line]
    return comments[0].partition(":")[0] if comments else ""


@hydra.main(config_path="pkg://configs", config_name="config", version_base="1.3")
def _run(cfg: DictConfig) -> None:
    apply_job_environment()
    # after validation: importing jax is the slow part
    from scaling.training.loop import finished_result, member_config, sweep_lrs, train_sweep

    run_cfg = to_run_config(OmegaConf.to_container(cfg, resolve=True))
    finished = {r["run_dir"] for lr in sweep_lrs(run_cfg)
                if (r := finished_result(member_config(run_cfg, lr)))}
    try:
        results = train_sweep(run_cfg)
    except ConfigError as error:
        fail("scaling-train", error)
    for result in results:  # one per LR when sweep.log2_lr_min/max define a grid
        print(_result_line(result, result["run_dir"] in finished))


def _result_line(result: dict, already_finished: bool) -> str:
    done = "already finished, not retrained: " if already_finished else ""
    losses = f"train_loss={result['train_loss']} val_loss={result['val_loss']}"
    return (f"{result['run_dir']}: {done}{losses} diverged={result['diverged']} "
            f"steps={result['steps']} wall={result['wall_seconds']:.1f}s")


def main(argv: list[str] | None = None) -> None:
    run_command("scaling-train", argv, help_text, precheck, _run)


if __name__ == "__main__":
    main()
