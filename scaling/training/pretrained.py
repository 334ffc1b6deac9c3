"""Fine-tuning's starting point: a finished run's last parameters, checked to fit the run that
starts from them (`init.from_run`)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from scaling.config import ConfigError, RunConfig, from_dict
from scaling.training.checkpoint import Checkpointer

# How the model computes, not what it is: a fine-tune may change these.
NUMERICS_FIELDS = ("compute_dtype", "scan_unroll")
SOURCE_GROUPS = ("model", "param")  # a fine-tune's model and its parametrization are its source's


def source_result(from_run: str) -> dict:
    """The source run's result.json; a ConfigError unless it finished without diverging."""
    run_dir = Path(from_run).expanduser()
    result_file = run_dir / "result.json"
    if not result_file.is_file() or not (run_dir / "checkpoints").is_dir():
        raise ConfigError("init.from_run", from_run,
                          "a finished run's directory (with result.json and checkpoints/)")
    result = json.loads(result_file.read_text())
    if result["diverged"]:
        raise ConfigError("init.from_run", from_run, "a run that did not diverge")
    return result


def source_config(from_run: str) -> RunConfig:
    """The config the source run was trained with (its result.json's)."""
    return from_dict(source_result(from_run)["config"])


def check_compatible(cfg: RunConfig, source: RunConfig) -> None:
    """The fine-tune's model and param groups are the source's (but for numerics), and its data
    has the source's vocabulary: otherwise the weights would not fit, or mean something else."""
    for group in SOURCE_GROUPS:
        ours, theirs = dataclasses.asdict(getattr(cfg, group)), dataclasses.asdict(
            getattr(source, group))
        for field, value in ours.items():
            if field not in NUMERICS_FIELDS and value != theirs[field]:
                raise ConfigError(f"{group}.{field}", value,
                                  f"{theirs[field]!r}, the source run's "
                                  f"(init.from_run={cfg.init.from_run})")
    ours, theirs = cfg.data.source_vocab_size, source.data.source_vocab_size
    if ours != theirs:
        raise ConfigError("data.path", cfg.data.path,
                          f"a source of the source run's vocabulary of {theirs} tokens, not "
                          f"{ours} (init.from_run={cfg.init.from_run})")


def restore_params(from_run: str, template: dict, like: Any) -> Any:
    """The parameters of the source's last checkpoint, in the dtypes of `like`. `template` is a
    train state of the source's shape: its optimizer state is the source optimizer's."""
    checkpointer = Checkpointer(Path(from_run).expanduser() / "checkpoints")
    try:
        restored = checkpointer.restore_latest(template)
    finally:
        checkpointer.close()
    if restored is None:
        raise ConfigError("init.from_run", from_run, "a run with a checkpoint in checkpoints/")
    return jax.tree.map(lambda p, fresh: jnp.asarray(p, fresh.dtype), restored[1]["params"], like)
