"""Shared test setup: CPU with 8 simulated devices, a persistent compilation cache, W&B off
unless a test turns it on."""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# 8 simulated CPU devices for the sharding tests; a run without a mesh uses the first alone
SIMULATED_DEVICES = 8
# LLVM's optimizations off: the suite compiles hundreds of small programs and runs each a few
# steps, so compiling is most of its time (measured: the whole suite 26% faster on 2 cores, the
# same programs and every tolerance and golden value still met); a flag already set is kept
FAST_COMPILE = "--xla_backend_optimization_level=0"
_flags = os.environ.get("XLA_FLAGS", "")
if "--xla_backend_optimization_level" not in _flags:
    _flags += " " + FAST_COMPILE
os.environ["XLA_FLAGS"] = (
    f"{_flags} --xla_force_host_platform_device_count={SIMULATED_DEVICES}".strip())
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

import jax
import pytest

pytest.register_assert_rewrite("synthetic")  # its shared assertions report like a test's own

REPO = Path(__file__).resolve().parents[1]

# SCALING_TEST_JAX_CACHE overrides the cache folder: point it at an empty one to time the suite
# as a fresh clone (CI) runs it. Subprocesses (the kill -9 run, benchmarks/gpu.sh) share it.
JAX_CACHE = Path(os.environ.get("SCALING_TEST_JAX_CACHE", REPO / ".jax_cache"))
os.environ["JAX_COMPILATION_CACHE_DIR"] = str(JAX_CACHE)
jax.config.update("jax_compilation_cache_dir", str(JAX_CACHE))
# every program, however quick to compile: the tests compile many small ones again and again
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

# A run small enough to train in seconds on 2 CPU cores (Hydra override syntax). Without the
# stability indicators and the spectral log, which tests/test_indicators.py turns on: measured,
# the indicators add 60% to a train step's compile time, and most tests compile several steps.
TINY_RUN = [
    "model.width=64", "model.depth=2", "param.base_width=32", "train.steps=12",
    "train.batch_size=4", "train.seq_len=32", "train.eval_every=6", "train.eval_batches=2",
    "train.log_every=3", "train.checkpoint_every=6", "optim.warmup_steps=2", "logging.wandb_mode=disabled",
    "logging.progress=false", "logging.indicators=false", "logging.spectral_every=0",
]
# TINY_RUN cut to 3 steps with one evaluation: for runs in fresh processes (launchers, several
# hosts), whose start-up and compiles are most of their time.
QUICK_JOB = [*TINY_RUN, "train.steps=3", "train.eval_every=3", "train.log_every=1",
             "train.checkpoint_every=3", "train.eval_batches=1", "optim.warmup_steps=1"]


@pytest.fixture(autouse=True, scope="session")
def stdlib_corpus_read_once():
    """The default corpus (the standard library's bytes) is read and split once per session
    instead of once per run (measured: 55 reads of ~0.3 s): it cannot change while the tests run. Its
    arrays are made read-only, so a run that wrote into them would fail instead of leaking into
    later tests. Other sources (files, folders, .bin) are read every time, as before."""
    from scaling.training import data

    read = data.load

    @functools.cache
    def stdlib(cfg, seq_len):
        splits = read(cfg, seq_len)
        splits.train.flags.writeable = splits.val.flags.writeable = False
        return splits

    def load(cfg, seq_len):
        return stdlib(cfg, seq_len) if cfg.path is None else read(cfg, seq_len)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(data, "load", load)
        yield


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
