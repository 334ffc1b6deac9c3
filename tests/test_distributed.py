"""Several hosts: when jax.distributed starts (config or environment), and a real two-process
run on localhost (CPU, gloo collectives) that trains over both processes' devices and writes
its logs and result once."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from conftest import QUICK_JOB, REPO

from scaling.config import MeshConfig
from scaling.distributed import cluster_in_environment, wanted

SLURM_STEP = {"SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1"}


@pytest.mark.parametrize("environ, found", [
    ({}, None),
    (SLURM_STEP, "SLURM"),
    ({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, None),  # one task: a plain job
    ({"SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"}, None),  # no srun
    ({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}, "TPU pod"),
    ({"TPU_WORKER_HOSTNAMES": "t0"}, None),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, "JAX_COORDINATOR_ADDRESS"),
])
def test_cluster_in_environment(environ, found):
    assert cluster_in_environment(environ) == found


def test_distributed_is_wanted_by_config_or_environment():
    assert not wanted(MeshConfig(), {})
    assert wanted(MeshConfig(), SLURM_STEP)
    assert not wanted(MeshConfig(distributed="off"), SLURM_STEP)
    assert wanted(MeshConfig(distributed="on"), {})
    assert wanted(MeshConfig(coordinator_address="localhost:1234"), {})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


# the command line, each process printing which rows of step 0's batch it reads
ROWS_READ_CHILD = """
import runpy
import scaling.training.data as data
batch = data.train_batch
def train_batch(tokens, seed, step, batch_size, seq_len, rows=slice(None)):
    if step == 0:
        print("rows read at step 0:", list(range(batch_size))[rows], flush=True)
    return batch(tokens, seed, step, batch_size, seq_len, rows=rows)
data.train_batch = train_batch
assemble = data.global_batch
def global_batch(tokens, seed, step, *args):
    inputs, targets = assemble(tokens, seed, step, *args)
    if step == 0:  # the global batch as every process sees it, gathered from both
        from jax.experimental import multihost_utils
        whole = multihost_utils.process_allgather(inputs, tiled=True)
        print("assembled step 0:", whole.tolist(), flush=True)
    return inputs, targets
data.global_batch = global_batch
runpy.run_module("experiments.train", run_name="__main__", alter_sys=True)
"""


def _rows_read(output: str) -> list[int]:
    return [row for line in output.splitlines() if line.startswith("rows read at step 0:")
            for row in json.loads(line.partition(":")[2])]


@pytest.mark.slow
def test_two_processes_train_one_run(tmp_path):
    """Two processes of 2 CPU devices each, one fsdp mesh of 4: both finish the same run, only
    process 0 writes metrics and result.json, and the losses are the one-process run's (slow:
    three fresh processes, 34 s on 2 cores; the default suite checks when jax.distributed starts
    and, in tests/test_sharding.py, the same run on a mesh of one process's 8 devices). Each
    process reads only the rows of the batch its devices hold, and the losses show the
    assembled batch is the one-process batch."""
    out, port = tmp_path / "runs", _free_port()
    run = [*QUICK_JOB, "train.batch_size=4"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO),
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    processes = [subprocess.Popen(
        [sys.executable, "-c", ROWS_READ_CHILD, *run, "mesh=fsdp",
         f"mesh.coordinator_address=localhost:{port}", "mesh.num_processes=2",
         f"mesh.process_id={i}", f"train.out_dir={out}"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    outputs = [p.communicate(timeout=240)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    (run_dir,) = out.iterdir()
    result = json.loads((run_dir / "result.json").read_text())
    assert result["sharding"]["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert result["sharding"]["processes"] == 2
    logged = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3]  # once each, by process 0
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == ["3"]
    for output in outputs:  # each process reports the same finished run
        assert f"{run_dir}: train_loss={result['train_loss']}" in output
    # each process read the two rows its two devices hold, and together the whole batch
    rows = [_rows_read(output) for output in outputs]
    assert [len(r) for r in rows] == [2, 2] and sorted(rows[0] + rows[1]) == [0, 1, 2, 3], rows
    from experiments.compose import compose, to_run_config
    from scaling.training import data
    from scaling.training.loop import train

    # the assembled global batch is the one a single process draws
    cfg = to_run_config(compose(run))
    splits = data.load(cfg.data, cfg.train.seq_len)
    inputs, _ = data.train_batch(splits.train, cfg.train.seed, 0, cfg.train.batch_size,
                                 cfg.train.seq_len)
    for output in outputs:
        (line,) = [x for x in output.splitlines() if x.startswith("assembled step 0:")]
        assert json.loads(line.partition(":")[2]) == inputs.tolist()

    alone = train(to_run_config(compose([*run, f"train.out_dir={tmp_path / 'alone'}"])))
    assert alone["name"] == result["name"]
    assert alone["val_loss"] == pytest.approx(result["val_loss"], rel=1e-5)
