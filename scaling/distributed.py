"""Several hosts: `jax.distributed.initialize()` from the config or the environment, before the
first JAX operation; and which process writes (process 0: logs, results, W&B)."""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax

from scaling.config import ConfigError, MeshConfig


def cluster_in_environment(environ: Mapping[str, str] = os.environ) -> str | None:
    """The multi-process launch the environment describes, or None for one process: a SLURM
    step with several tasks (srun), a TPU pod slice with several hosts, or a coordinator
    named in JAX_COORDINATOR_ADDRESS (which jax.distributed reads itself)."""
    if int(environ.get("SLURM_STEP_NUM_TASKS", environ.get("SLURM_NTASKS", "1"))) > 1 \
            and "SLURM_PROCID" in environ:
        return "SLURM"
    if len([h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return "TPU pod"
    if environ.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    return None


def wanted(cfg: MeshConfig, environ: Mapping[str, str] = os.environ) -> bool:
    """mesh.distributed: on, off, or auto (a coordinator in the config or a cluster around)."""
    if cfg.distributed != "auto":
        return cfg.distributed == "on"
    return cfg.coordinator_address is not None or cluster_in_environment(environ) is not None


def initialize(cfg: MeshConfig) -> bool:
    """Starts jax.distributed once per process if `cfg` wants it; True if it runs (now or
    before). The fields left null are detected by JAX from the cluster (SLURM, TPU, MPI)."""
    if not wanted(cfg):
        return False
    if jax.distributed.is_initialized():
        return True
    given = {"coordinator_address": cfg.coordinator_address,
             "num_processes": cfg.num_processes, "process_id": cfg.process_id}
    try:
        jax.distributed.initialize(**{k: v for k, v in given.items() if v is not None})
    except (RuntimeError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise ConfigError("mesh.distributed", cfg.distributed,
                          "a cluster jax.distributed can join, set before any JAX operation "
                          f"in this process ({first_line})") from error
    return True


def is_primary() -> bool:
    """Process 0 writes what a run writes once: metrics, results, W&B."""
    return jax.process_index() == 0
