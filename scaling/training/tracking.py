"""W&B logging: offline by default, one run per run directory, resumed under the same id."""

from __future__ import annotations

from pathlib import Path

from scaling.config import RunConfig, to_dict
from scaling.training.rundir import config_hash


class Tracker:
    def __init__(self, cfg: RunConfig, run_dir: Path, name: str):
        self.run = None
        if cfg.logging.wandb_mode == "disabled":
            return
        import wandb  # slow to import; only when logging is on

        self.run = wandb.init(
            project=cfg.logging.project, group=cfg.logging.group, name=name,
            id=f"{name.split('-')[0]}-{config_hash(cfg, 16)}", resume="allow",
            dir=str(run_dir), mode=cfg.logging.wandb_mode, config=to_dict(cfg),
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
