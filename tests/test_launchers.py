"""Sweeps through Hydra's launcher plugins: our launcher configs compose, each parallel job gets
its share of the machine, and joblib and submitit sweeps train jobs whose results analyse."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import pytest
from conftest import QUICK_JOB, REPO, TINY_RUN
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig

from experiments.compose import precheck
from experiments.demo import main as demo_main
from experiments.launcher_env import (
    JOBLIB,
    NO_PINNING,
    SUBMITIT_LOCAL,
    apply_job_environment,
    core_share,
    job_environment,
)
from scaling.analysis import analyze, load_results

SLURM = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"


def _hydra_config(launcher: str, *overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="configs", version_base="1.3"):
        return compose("config", overrides=[f"hydra/launcher={launcher}", *overrides],
                       return_hydra_config=True)


@pytest.mark.parametrize(("launcher", "fields"), [
    ("joblib", {"_target_": JOBLIB, "n_jobs": -1}),
    ("parallel", {"_target_": JOBLIB, "n_jobs": 2}),
    ("submitit_local", {"_target_": SUBMITIT_LOCAL}),
    # one process on one GPU per array task, requeued after a time-out
    ("slurm", {"_target_": SLURM, "tasks_per_node": 1, "gpus_per_node": 1, "nodes": 1,
               "array_parallelism": 64, "signal_delay_s": 120}),
])
def test_launcher_configs_compose(launcher, fields):
    cfg = _hydra_config(launcher)
    assert {key: cfg.hydra.launcher[key] for key in fields} == fields
    if launcher == "slurm":
        assert cfg.hydra.launcher.max_num_timeout > 0 and cfg.hydra.launcher.cpus_per_task >= 1
    if launcher.startswith(("submitit", "slurm")):  # logs beside the runs, not in the checkout
        assert cfg.hydra.launcher.submitit_folder == f"{cfg.train.out_dir}/.submitit/%j"


def test_precheck_leaves_launcher_overrides_to_hydra():
    argv = ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "train.seed=0,1", *TINY_RUN]
    assert precheck(argv)[:len(argv)] == argv


def test_parallel_jobs_share_the_gpu():
    two = {"_target_": JOBLIB, "n_jobs": 2}
    assert job_environment(two, cpus=8, gpu=True, environ={}) == {
        "XLA_PYTHON_CLIENT_PREALLOCATE": "false", "XLA_CLIENT_MEM_FRACTION": "0.450"}
    # joblib's n_jobs=-1 is one job per core; submitit's local jobs are sized by cpus_per_task
    assert job_environment({"_target_": JOBLIB, "n_jobs": -1}, 8, True, {})[
        "XLA_CLIENT_MEM_FRACTION"] == "0.113"
    local = {"_target_": SUBMITIT_LOCAL, "cpus_per_task": 2}
    assert job_environment(local, 8, True, {})["XLA_CLIENT_MEM_FRACTION"] == "0.225"
    # no thread variables on CPU: the cores are shared by pinning, not by flags
    assert job_environment(two, cpus=8, gpu=False, environ={}) == {}
    # jaxlib refuses both fraction variables at once, so the user's old spelling stays alone
    mine = job_environment(two, 8, True, {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.3"})
    assert mine == {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}


def test_a_job_alone_or_on_slurm_is_left_alone():
    for launcher in ({"_target_": JOBLIB, "n_jobs": 1}, {"_target_": SLURM, "gpus_per_node": 1},
                     {"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}):
        assert job_environment(launcher, cpus=16, gpu=True, environ={}) == {}


def test_apply_job_environment_sets_only_what_the_user_did_not(monkeypatch):
    monkeypatch.setattr(os, "environ", {"XLA_PYTHON_CLIENT_PREALLOCATE": "true",
                                        "CUDA_VISIBLE_DEVICES": "0", NO_PINNING: "1"})
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1, 2, 3})
    saved = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(_hydra_config("parallel", "+experiment=lr_width_sweep"))
    try:
        apply_job_environment()
    finally:
        HydraConfig.instance().cfg = saved
    assert os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == "true"
    assert os.environ["XLA_CLIENT_MEM_FRACTION"] == "0.450"


def test_core_shares_split_the_cores_contiguously():
    assert [core_share([0, 1, 2, 3, 4, 5, 6, 7], s, 3) for s in range(3)] == \
        [[0, 1], [2, 3, 4], [5, 6, 7]]
    assert [core_share([4, 9], s, 4) for s in range(4)] == [[4], [4], [9], [9]]  # > 1 job a core


# claims two slots (the second must repeat the first), prints slot and affinity, then holds the
# slot until its stdin closes
_CLAIM = """
import os, sys, warnings
from pathlib import Path
from experiments.launcher_env import claim_cores, claim_slot
warnings.simplefilter("ignore")
cores = claim_cores(Path(sys.argv[1]), 2)
print(claim_slot(Path(sys.argv[1]), 2), claim_slot(Path(sys.argv[1]), 2),
      ",".join(map(str, sorted(os.sched_getaffinity(0)))) if cores else "-", flush=True)
sys.stdin.read()
"""


def _claimer(folder) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _CLAIM, str(folder)], cwd=REPO, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)


def _claimed(proc: subprocess.Popen) -> tuple[str, str, set[str]]:
    slot, again, cores = proc.stdout.readline().split()
    return slot, again, set(cores.split(","))


def test_parallel_jobs_claim_different_slots_and_disjoint_cores(tmp_path):
    first, second = _claimer(tmp_path), _claimer(tmp_path)
    (slot_a, again_a, cores_a), (slot_b, again_b, cores_b) = _claimed(first), _claimed(second)
    assert {slot_a, slot_b} == {"0", "1"} and (again_a, again_b) == (slot_a, slot_b)
    if len(os.sched_getaffinity(0)) >= 2:  # one core can only be shared
        assert not cores_a & cores_b
    full = _claimer(tmp_path)  # both slots held: affinity left alone
    assert _claimed(full)[0] == "None"
    full.communicate("")
    first.communicate("")  # an ended job's slot is free again
    reuse = _claimer(tmp_path)
    assert _claimed(reuse)[0] == slot_a
    reuse.communicate("")
    second.communicate("")


def _sweep(tmp_path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "WANDB_MODE": "disabled",
           "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5"}
    argv = [sys.executable, "-m", "experiments.train", "-m", *overrides, "train.seed=0,1",
            *QUICK_JOB, f"train.out_dir={tmp_path / 'runs'}"]
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_joblib_sweep_trains_jobs_in_parallel_each_over_its_lr_grid(tmp_path):
    """Two jobs at once, each training a vectorized grid of two LRs: four runs to analyse."""
    _sweep(tmp_path, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "sweep.log2_lr_min=-8",
           "sweep.log2_lr_max=-7", "sweep.log2_lr_step=1", "sweep.vectorize_lr=2")
    results = load_results(tmp_path / "runs")
    assert sorted((r["config"]["train"]["seed"], r["config"]["optim"]["lr"]) for r in results) \
        == [(0, 2**-8), (0, 2**-7), (1, 2**-8), (1, 2**-7)]
    assert all(r["steps"] == 3 and r["lrs_trained_together"] == 2 for r in results)
    [shape] = analyze(results)["shapes"]
    assert shape["seeds"] == [0, 1] and [p["n"] for p in shape["curve"]] == [2, 2]


@pytest.mark.slow
def test_submitit_local_sweep_writes_its_logs_beside_the_runs(tmp_path):
    """submitit's local executor, the SLURM launcher's own machinery, end to end (slow: 18 s of
    job start-ups; in the default suite its config composes and joblib's sweep runs the same
    Hydra launch path)."""
    _sweep(tmp_path, "hydra/launcher=submitit_local")
    results = load_results(tmp_path / "runs")
    assert sorted(r["config"]["train"]["seed"] for r in results) == [0, 1]
    [shape] = analyze(results)["shapes"]
    assert shape["seeds"] == [0, 1]
    logs = list((tmp_path / "runs" / ".submitit").rglob("*_log.out"))
    assert len(logs) == 2 and all("completed successfully" in p.read_text() for p in logs)
    assert not (REPO / ".submitit").exists()


def test_demo_rejects_an_unknown_launcher_before_running(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo_main(["--quick", "--launcher", "jobli", "--out-dir", str(tmp_path / "demo")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("scaling-demo: error: --launcher=jobli")
    assert "joblib" in err and "slurm" in err
    assert not (tmp_path / "demo").exists()


@pytest.mark.slow
def test_demo_through_a_launcher_tells_the_same_story(tmp_path):
    """`scaling-demo --quick --launcher parallel`: the proxy sweep through joblib, then the rest."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "experiments.demo", "--quick", "--launcher",
                           "parallel", "--out-dir", str(tmp_path / "demo")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "hydra/launcher=parallel" in proc.stdout and "[4/4] verdict" in proc.stdout
    assert (tmp_path / "demo" / "verdict.json").is_file()
