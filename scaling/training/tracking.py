"""W&B logging: offline by default, one run per run directory, resumed under the same id."""

from __future__ import annotations

import os
from pathlib import Path

from scaling.config import WANDB_MODES, ConfigError, LoggingConfig, RunConfig, to_dict
from scaling.training.rundir import config_hash

DEFAULT_MODE, DEFAULT_PROJECT = "offline", "scaling"


def wandb_mode(cfg: LoggingConfig) -> str:
    """logging.wandb_mode if set, else the user's WANDB_MODE, else offline (nothing uploads)."""
    mode = cfg.wandb_mode or os.environ.get("WANDB_MODE") or DEFAULT_MODE
    if mode not in WANDB_MODES:
        raise ConfigError("WANDB_MODE", mode, f"one of {list(WANDB_MODES)} (from the environment)")
    return mode


def wandb_project(cfg: LoggingConfig) -> str:
    return cfg.project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT


def wandb_entity(cfg: LoggingConfig) -> str | None:
    return cfg.entity or os.environ.get("WANDB_ENTITY") or None


class Tracker:
    def __init__(self, cfg: RunConfig, run_dir: Path, name: str):
        self.run = None
        mode = wandb_mode(cfg.logging)
        if mode == "disabled":
            return
        import wandb  # slow to import; only when logging is on

        self.run = wandb.init(
            project=wandb_project(cfg.logging), entity=wandb_entity(cfg.logging),
            group=cfg.logging.group, name=name,
            id=f"{name.split('-')[0]}-{config_hash(cfg, 16)}", resume="allow",
            dir=str(run_dir), mode=mode, config=to_dict(cfg),
            job_type="train", reinit="create_new",  # several LRs of a grid log at once
            settings=wandb.Settings(silent=True, console="off"))

    def log(self, metrics: dict, step: int) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def abort(self) -> None:
        if self.run is not None:
            self.run.finish(exit_code=1)

    def finish(self, summary: dict) -> None:
        if self.run is not None:
            self.run.summary.update(summary)
            self.run.finish()
