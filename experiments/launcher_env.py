"""Per-job environment for sweeps whose jobs share one machine (docs/clusters.md): k parallel
JAX processes each get 1/k of the CPU threads and of the GPU's memory instead of all of it."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# XLA's documented switch to one-threaded CPU kernels; jax 0.10's CPU runtime accepts it but was
# measured to keep using every core (docs/clusters.md), so the thread variables below matter too
CPU_XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads={threads}"
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
GPU_MEMORY_SHARED = 0.9  # of the GPU's memory, split among the jobs; the rest is CUDA's own
JOBLIB = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
SUBMITIT_LOCAL = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"


def parallel_jobs(launcher: Mapping[str, Any], cpus: int) -> int:
    """How many of the sweep's jobs run on this machine at once, from `hydra.launcher`."""
    target = launcher.get("_target_")
    if target == JOBLIB:
        n_jobs = launcher.get("n_jobs") or 1
        # joblib's convention: -1 is every core, -2 all but one, ...
        return max(1, cpus + 1 + n_jobs if n_jobs < 0 else n_jobs)
    if target == SUBMITIT_LOCAL and launcher.get("cpus_per_task"):
        return max(1, cpus // launcher["cpus_per_task"])
    return 1  # one job at a time (basic launcher), or a cluster job with its own resources


def job_environment(launcher: Mapping[str, Any], cpus: int, gpu: bool,
                    environ: Mapping[str, str]) -> dict[str, str]:
    """The variables one job sets so that its machine's k parallel jobs do not oversubscribe it:
    none for a job alone; XLA_FLAGS extends the user's own flags, never replaces them."""
    jobs = parallel_jobs(launcher, cpus)
    if jobs == 1:
        return {}
    threads = max(1, cpus // jobs)
    user_flags = environ.get("XLA_FLAGS", "")
    settings = {name: str(threads) for name in THREAD_VARIABLES}
    if "xla_cpu_multi_thread_eigen" not in user_flags:
        settings["XLA_FLAGS"] = f"{user_flags} {CPU_XLA_FLAGS.format(threads=threads)}".strip()
    if gpu:
        # grow on demand up to this job's share, instead of taking 75% of the GPU at start
        settings["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
        settings["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{GPU_MEMORY_SHARED / jobs:.3f}"
    return settings


def gpu_visible(environ: Mapping[str, str]) -> bool:
    """Whether this process could see an NVIDIA GPU, judged without starting JAX."""
    if environ.get("JAX_PLATFORMS", "").strip() == "cpu":
        return False
    if "CUDA_VISIBLE_DEVICES" in environ:
        return environ["CUDA_VISIBLE_DEVICES"].strip() not in ("", "-1")
    return any(Path("/dev").glob("nvidia[0-9]*"))


def apply_job_environment() -> None:
    """Sets this Hydra job's variables in os.environ, each unless the user set it already.

    Call it before anything runs on a JAX device: JAX reads these variables when it creates its
    backend, at the first computation, not at `import jax`.
    """
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    # the cores this process may use (a cgroup or taskset can allow fewer than the machine has)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    settings = job_environment(HydraConfig.get().launcher, cpus, gpu_visible(os.environ),
                               os.environ)
    for name, value in settings.items():
        if name == "XLA_FLAGS":  # already holds the user's flags
            os.environ[name] = value
        else:
            os.environ.setdefault(name, value)
