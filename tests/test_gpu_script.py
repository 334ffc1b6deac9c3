"""benchmarks/gpu.sh --tiny: every GPU measurement still runs, at tiny sizes on CPU, without the
packages the GPU machine's image lacks (Hydra, OmegaConf, W&B, Hugging Face tokenizers)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO

# benchmarks/ is not an installed package: load the suite from its file for its list of names
_spec = importlib.util.spec_from_file_location("gpu_suite", REPO / "benchmarks" / "gpu_suite.py")
gpu_suite = sys.modules["gpu_suite"] = importlib.util.module_from_spec(_spec)  # for dataclasses
_spec.loader.exec_module(gpu_suite)


# Not in the GPU machine's image (Python 3.12, jax with CUDA, flax, optax, orbax-checkpoint,
# chex, numpy, matplotlib, tqdm): nothing gpu.sh runs may import them, even indirectly.
BLOCKED = ("hydra", "omegaconf", "wandb", "tokenizers")
# Imported by every Python that gpu.sh starts (site imports the first sitecustomize on sys.path,
# and PYTHONPATH is inherited): a meta-path finder before all others, for which the blocked
# packages do not exist.
SITECUSTOMIZE = f"""\
import sys

BLOCKED = {BLOCKED!r}


class NotInTheGPUImage:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(
                f"No module named {{name!r}} (blocked: not in the GPU machine's image)", name=name)
        return None


for name in [n for n in sys.modules if n.partition(".")[0] in BLOCKED]:
    del sys.modules[name]
sys.meta_path.insert(0, NotInTheGPUImage)
"""

BLOCK_PROBE = f"""\
import importlib

for name in {BLOCKED!r}:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as error:
        assert "blocked" in str(error), error
    else:
        raise SystemExit(f"{{name}} imported")
"""


def gpu_image_env(tmp_path) -> dict[str, str]:
    """The test's environment with BLOCKED made unimportable for every Python started in it;
    checked to block before it is used."""
    site = tmp_path / "gpu_image_site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    pythonpath = os.pathsep.join([str(site), str(REPO)])
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": pythonpath}
    probe = subprocess.run([sys.executable, "-c", BLOCK_PROBE], env=env, capture_output=True,
                           text=True, timeout=60, check=False)
    assert probe.returncode == 0, probe.stdout + probe.stderr
    return env


def _numbers(value):
    """Every number in a JSON value (booleans are not numbers here)."""
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in _numbers(v)]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [value]
    return []


# every benchmark module the suite calls (call_main), imported where the blocked packages fail
IMPORT_PROBE = """\
import importlib
import re
import sys
from pathlib import Path

sys.path.insert(0, "benchmarks")  # as a script's own folder is: they import their siblings
source = Path("benchmarks/gpu_suite.py").read_text()
modules = sorted(set(re.findall(r'call_main\\("(\\w+)"', source)))
assert len(modules) >= 6, modules
for module in ["gpu_suite", *modules]:
    importlib.import_module(f"benchmarks.{module}")
print(" ".join(modules))
"""


def test_every_benchmark_the_gpu_script_runs_imports_without_the_missing_packages(tmp_path):
    """The GPU image's packages suffice to import gpu.sh's suite and every benchmark it calls
    (the measurements themselves, at tiny sizes, run under `-m slow`: 85 s of compiles)."""
    env = gpu_image_env(tmp_path)
    run = subprocess.run([sys.executable, "-c", IMPORT_PROBE], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert set(run.stdout.split()) >= {"muon_step", "train_step", "sharding", "attention"}


@pytest.mark.slow
def test_tiny_gpu_script_writes_every_measurement(tmp_path):
    """Every measurement succeeds with Hydra, OmegaConf and W&B unimportable, as on the GPU
    (slow: every benchmark's programs compiled, 85 s on 2 cores with a cold cache)."""
    env = gpu_image_env(tmp_path)
    out = tmp_path / "out"
    run = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh"), "--tiny", str(out)],
                         env=env, capture_output=True, text=True, timeout=240, check=False)
    log = run.stdout[-4000:] + run.stderr[-4000:]
    assert run.returncode == 0, log
    summary = json.loads((out / "summary.json").read_text())["measurements"]
    for name in gpu_suite.NAMES:
        assert summary[name]["status"] == "ok", (name, summary[name], log)
        numbers = _numbers(json.loads((out / f"{name}.json").read_text()))
        assert numbers, f"{name}.json holds no numbers"
        assert all(math.isfinite(n) for n in numbers), (name, [n for n in numbers
                                                               if not math.isfinite(n)])
    assert summary["ns_kernels"]["headline"]["matched"] is True, summary["ns_kernels"]
    assert summary["train_step_default"]["headline"]["matched"] is True
    assert summary["train_step_w512_d8"]["headline"]["matched"] is True
    # on CPU: the programs' own accounting, and no device counter to read
    assert summary["mezo_memory"]["headline"]["peak_source"] == "summed"
    assert summary["mezo_memory"]["headline"]["device_mezo_over_forward_at_most"] is None
    # on CPU cuDNN is not tried; XLA's attention is still timed
    attention = summary["attention"]["headline"]
    assert attention["cudnn"].startswith("cudnn skipped"), attention
    assert set(attention["forward_ms"]) == set(attention["forward_backward_ms"]) == {"xla"}
    assert (out / "summary.txt").read_text().count(": ok in ") == len(gpu_suite.NAMES)


def test_sharding_benchmark_runs_are_what_scaling_train_composes():
    """benchmarks/sharding.py builds its runs from the library's dataclasses (the GPU image has
    no Hydra): each row's RunConfig is the one scaling-train composes from the same overrides."""
    from experiments.compose import compose, to_run_config

    spec = importlib.util.spec_from_file_location("benchmark_sharding",
                                                  REPO / "benchmarks" / "sharding.py")
    sharding = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sharding)
    rows = [overrides for model in ([], gpu_suite.SHARDING_TINY_MODEL) for overrides in (
        *(sharding.train_overrides(model, mesh) for mesh in sharding.MESHES),
        *(sharding.muon_overrides(model, width, kind)
          for width in (32, 1024) for kind in ("stack", "compiler")))]
    for overrides in rows:
        assert sharding.run_config(overrides) == to_run_config(compose(overrides)), overrides


def test_gpu_budget_fits_in_eight_minutes():
    """Every measurement's own limit fits in gpu.sh's budget, and the budget in 8 minutes (the
    device time a session has left after the machine starts)."""
    script = (REPO / "benchmarks" / "gpu.sh").read_text()
    budget_s = int(re.search(r"^mode=\(\); budget_s=(\d+)$", script, re.MULTILINE).group(1))
    assert sum(m.limit_s for m in gpu_suite.MEASUREMENTS) <= budget_s - 5 <= 8 * 60
