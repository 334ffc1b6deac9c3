"""benchmarks/gpu.sh --tiny: every GPU measurement still runs, at tiny sizes on CPU."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys

from conftest import REPO

# benchmarks/ is not an installed package: load the suite from its file for its list of names
_spec = importlib.util.spec_from_file_location("gpu_suite", REPO / "benchmarks" / "gpu_suite.py")
gpu_suite = sys.modules["gpu_suite"] = importlib.util.module_from_spec(_spec)  # for dataclasses
_spec.loader.exec_module(gpu_suite)


def _numbers(value):
    """Every number in a JSON value (booleans are not numbers here)."""
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in _numbers(v)]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [value]
    return []


def test_tiny_gpu_script_writes_every_measurement(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(REPO)}
    run = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh"), "--tiny", str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=240, check=False)
    log = run.stdout[-4000:] + run.stderr[-4000:]
    assert run.returncode == 0, log
    summary = json.loads((tmp_path / "summary.json").read_text())["measurements"]
    for name in gpu_suite.NAMES:
        assert summary[name]["status"] == "ok", (name, summary[name], log)
        numbers = _numbers(json.loads((tmp_path / f"{name}.json").read_text()))
        assert numbers, f"{name}.json holds no numbers"
        assert all(math.isfinite(n) for n in numbers), (name, [n for n in numbers
                                                               if not math.isfinite(n)])
    assert summary["ns_kernels"]["headline"]["matched"] is True, summary["ns_kernels"]
    assert summary["train_step_default"]["headline"]["matched"] is True
    assert summary["train_step_w512_d8"]["headline"]["matched"] is True
    # on CPU: the programs' own accounting, and no device counter to read
    assert summary["mezo_memory"]["headline"]["peak_source"] == "summed"
    assert summary["mezo_memory"]["headline"]["device_mezo_over_forward_at_most"] is None
    assert (tmp_path / "summary.txt").read_text().count(": ok in ") == len(gpu_suite.NAMES)


def test_gpu_budget_fits_in_eight_minutes():
    """Every measurement's own limit fits in gpu.sh's budget, and the budget in 8 minutes (the
    device time a session has left after the machine starts)."""
    script = (REPO / "benchmarks" / "gpu.sh").read_text()
    budget_s = int(re.search(r"^mode=\(\); budget_s=(\d+)$", script, re.MULTILINE).group(1))
    assert sum(m.limit_s for m in gpu_suite.MEASUREMENTS) <= budget_s - 5 <= 8 * 60
