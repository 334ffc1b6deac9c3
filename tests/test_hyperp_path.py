"""HyperP in the form its law was fitted on (slow: about 4 minutes on 2 CPU cores; run by hand with
`pytest -m slow tests/test_hyperp_path.py`): along a joint width–depth path the MuonH optimum
falls as the law's √(d0/d) says, which the tables alone (no base-LR move) miss.

It runs the documented `joint_path` overlay at its first two points (w64 d2 → w128 d4), which
writes under runs/joint_path_check and skips finished runs; delete that folder to measure afresh.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from scaling.analysis import analyze, load_results

REPO = Path(__file__).resolve().parents[1]
SWEEP_DIR = REPO / "runs" / "joint_path_check"
COMMAND = ["-m", "+experiment=joint_path", "param=hyperp", "+path=w64_d2,w128_d4",
           f"train.out_dir={SWEEP_DIR}", "logging.progress=false", "logging.wandb_mode=disabled"]


@pytest.mark.slow
def test_the_hyperp_optimum_follows_its_law_along_a_joint_path():
    """Measured over widths 64→256 (docs/sweeps-and-transfer.md): −0.47 octave per joint
    doubling at the first one, the archscale law leaving +0.03. A law off by half its exponent
    (a width factor of (d0/d)^¼, or none) leaves ≥ 0.25 per doubling, beyond the seeds' spread
    of the two optima (± 0.03–0.05 each)."""
    script = Path(sys.executable).parent / "scaling-train"
    subprocess.run([str(script), *COMMAND], cwd=REPO, check=True,
                   env={**os.environ, "JAX_PLATFORMS": "cpu"})
    analysis = analyze(load_results(SWEEP_DIR))
    (path,) = analysis["path_drift"]
    assert path["widths"] == [64, 128] and path["depths"] == [2, 4]
    assert all(n == 2 for n in path["n_seeds"])
    assert not path["any_on_edge"], "an optimum sits on the grid edge: widen the grid"
    assert abs(path["laws"]["archscale"]["slope"]) <= 0.2, path
    assert path["laws"]["tables"]["slope"] <= -0.3, path
