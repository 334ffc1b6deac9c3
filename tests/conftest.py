"""Shared test setup: CPU, a persistent compilation cache, W&B off unless a test turns it on."""

from __future__ import annotations

import logging
import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

import jax
import pytest

pytest.register_assert_rewrite("synthetic")  # its shared assertions report like a test's own

REPO = Path(__file__).resolve().parents[1]

jax.config.update("jax_compilation_cache_dir", str(REPO / ".jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

# A run small enough to train in seconds on 2 CPU cores (Hydra override syntax).
TINY_RUN = [
    "model.width=64", "model.depth=2", "param.base_width=32", "train.steps=12",
    "train.batch_size=4", "train.seq_len=32", "train.eval_every=6", "train.eval_batches=2",
    "train.log_every=3", "train.checkpoint_every=6", "optim.warmup_steps=2", "logging.wandb_mode=disabled",
    "logging.progress=false",
]


@pytest.fixture
def tiny_run(tmp_path) -> list[str]:
    """Overrides for a tiny Transformer run writing under a temporary out_dir."""
    return [*TINY_RUN, f"train.out_dir={tmp_path / 'runs'}"]


@pytest.fixture
def restore_root_logging():
    """Hydra's job logging rebinds the root logger to the test's stdout; undo that after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
