"""Per-job settings for sweeps whose jobs share one machine (docs/clusters.md): k parallel JAX
processes each run on their own 1/k of the CPU cores and get 1/k of the GPU's memory."""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

GPU_MEMORY_SHARED = 0.9  # of the GPU's memory, split among the jobs; the rest is CUDA's own
# jaxlib 0.10.2 reads XLA_CLIENT_MEM_FRACTION, falls back to the deprecated
# XLA_PYTHON_CLIENT_MEM_FRACTION, and refuses the two together, so only the new name is set
MEM_FRACTION_VARIABLES = ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION")
NO_PINNING = "SCALING_NO_PINNING"
JOBLIB = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
SUBMITIT_LOCAL = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"

# this process's (slot, open lock fd, cores before pinning), once it claimed a slot
_claimed: tuple[int, int, list[int]] | None = None


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
    """The variables one job sets so that its machine's k parallel jobs share its GPU: none for
    a job alone or on CPU. CPU threads are not set here: pinning (`claim_cores`) shares them."""
    jobs = parallel_jobs(launcher, cpus)
    if jobs == 1 or not gpu:
        return {}
    # grow on demand up to this job's share, instead of taking 75% of the GPU at start
    settings = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    if not any(name in environ for name in MEM_FRACTION_VARIABLES):  # the user's fraction wins
        settings[MEM_FRACTION_VARIABLES[0]] = f"{GPU_MEMORY_SHARED / jobs:.3f}"
    return settings


def gpu_visible(environ: Mapping[str, str]) -> bool:
    """Whether this process could see an NVIDIA GPU, judged without starting JAX."""
    if environ.get("JAX_PLATFORMS", "").strip() == "cpu":
        return False
    if "CUDA_VISIBLE_DEVICES" in environ:
        return environ["CUDA_VISIBLE_DEVICES"].strip() not in ("", "-1")
    return any(Path("/dev").glob("nvidia[0-9]*"))


def core_share(cores: Sequence[int], slot: int, slots: int) -> list[int]:
    """Slot `slot`'s contiguous 1/`slots` of `cores`; at least one core when slots outnumber them."""
    low, high = slot * len(cores) // slots, (slot + 1) * len(cores) // slots
    return list(cores[low:max(high, low + 1)])


def launching_pid(target: str) -> int:
    """The pid of the process that launched the sweep, the same for all of its jobs here."""
    parent = os.getppid()  # joblib: the loky workers are children of the launching process
    if target == SUBMITIT_LOCAL:  # submitit starts one controller process per job in between
        stat = Path(f"/proc/{parent}/stat").read_text()
        parent = int(stat.rpartition(")")[2].split()[1])
    return parent


def slot_folder(sweep_dir: str, launcher_pid: int) -> Path:
    """The lock folder of this sweep on this machine: its jobs share it, other sweeps do not."""
    key = hashlib.sha1(f"{Path(sweep_dir).resolve()}\0{launcher_pid}".encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"scaling-slots-{key}"


def process_cores() -> list[int]:
    """The cores this process may use (a cgroup or taskset can allow fewer than the machine
    has), as they were before `claim_cores` pinned it."""
    return _claimed[2] if _claimed else sorted(os.sched_getaffinity(0))


def claim_slot(folder: Path, slots: int) -> int | None:
    """Locks the first free `slot-<s>.lock` in `folder` for the life of this process and returns
    s; the same s again once claimed (a reused worker); None when all `slots` are held."""
    global _claimed
    if _claimed is not None:
        return _claimed[0]
    folder.mkdir(parents=True, exist_ok=True)
    for slot in range(slots):
        fd = os.open(folder / f"slot-{slot}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        # the fd stays open: the slot is released when this process exits or crashes
        _claimed = (slot, fd, process_cores())
        return slot
    return None


def pin_threads(cores: Sequence[int]) -> None:
    """Restricts every thread of this process to `cores`; threads started later inherit it."""
    for task in os.listdir("/proc/self/task"):  # e.g. OpenBLAS's pool, started with numpy
        try:
            os.sched_setaffinity(int(task), cores)
        except ProcessLookupError:  # the thread ended meanwhile
            pass


def claim_cores(folder: Path, slots: int) -> list[int] | None:
    """Claims a slot in `folder` and pins this process to that slot's share of its cores; None,
    with a warning, when every slot is held."""
    first = _claimed is None
    slot = claim_slot(folder, slots)
    if slot is None:
        warnings.warn(f"no free core slot: all {slots} lock files in {folder} are held by "
                      "running jobs, expected one free; this job keeps all of its cores",
                      stacklevel=2)
        return None
    cores = core_share(process_cores(), slot, slots)
    if first:  # a reused worker is pinned already
        pin_threads(cores)
    return cores


def pin_job(launcher: Mapping[str, Any], sweep_dir: str, environ: Mapping[str, str]) -> None:
    """Pins this job to its share of the cores when it runs beside others on this machine."""
    if not hasattr(os, "sched_setaffinity") or environ.get(NO_PINNING, "") not in ("", "0"):
        return
    slots = parallel_jobs(launcher, len(process_cores()))
    if slots > 1:  # SLURM and a job alone count 1
        claim_cores(slot_folder(sweep_dir, launching_pid(launcher["_target_"])), slots)


def apply_job_environment() -> None:
    """Pins this Hydra job to its share of the cores and sets its GPU variables in os.environ,
    each unless the user set it already.

    Call it before anything runs on a JAX device: JAX reads these variables, and starts its CPU
    threads (which inherit the pinning), when it creates its backend at the first computation.
    """
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    pin_job(hydra_cfg.launcher, hydra_cfg.sweep.dir, os.environ)
    cpus = len(process_cores()) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    settings = job_environment(hydra_cfg.launcher, cpus, gpu_visible(os.environ), os.environ)
    for name, value in settings.items():
        os.environ.setdefault(name, value)
