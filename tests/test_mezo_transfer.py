"""MeZO's learning rate across width: the `mezo_width_sweep` overlay composes as its comment says
to run it, and (slow) a reduced rerun of the measurement in docs/sweeps-and-transfer.md."""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.compose import compose, sweep_points, to_run_config
from scaling.analysis import analyze, load_results
from scaling.config import lr_grid

COMMAND = ["-m", "+experiment=mezo_width_sweep", "optim.probe_scaling=isotropic,matched"]


def test_overlay_sweeps_isotropic_and_matched_probes_across_width():
    """Its usage line: MeZO, widths 32–256 from base 32, 2 seeds, update scaling following the
    probe scaling, the whole octave grid in one program per job."""
    jobs = [to_run_config(compose(point)) for point in sweep_points(COMMAND[1:])]  # validated
    assert sorted((c.optim.probe_scaling, c.model.width, c.train.seed) for c in jobs) == sorted(
        itertools.product(("isotropic", "matched"), (32, 64, 128, 256), (0, 1)))
    assert all(c.optim.update_scaling == c.optim.probe_scaling for c in jobs)
    assert {(c.optim.name, c.param.name, c.param.base_width, c.model.depth, c.train.steps)
            for c in jobs} == {("mezo", "mup", 32, 2, 200)}
    assert {(len(lr_grid(c.sweep)), c.sweep.vectorize_lr) for c in jobs} == {(9, 9)}
    sp = to_run_config(compose(["+experiment=mezo_width_sweep", "param=sp"]))
    assert (sp.param.name, sp.optim.probe_scaling, sp.optim.update_scaling) == (
        "sp", "isotropic", "isotropic")


REPO = Path(__file__).resolve().parents[1]
SWEEP_DIR = REPO / "runs" / "mezo_width_sweep"
REDUCED = ["model.width=32,128", "logging.progress=false"]  # 2 width doublings, 2 seeds


def _reduced_drift() -> dict:
    """μP drift per probe scaling over the reduced sweep's own runs (its widths and octave grid),
    so finished runs of the full sweep in the same folder are reused and nothing else counts."""
    script = Path(sys.executable).parent / "scaling-train"
    subprocess.run([str(script), *COMMAND, *REDUCED], cwd=REPO, check=True,
                   env={**os.environ, "JAX_PLATFORMS": "cpu", "WANDB_MODE": "disabled"})
    grid = {round(math.log2(lr), 6) for lr in lr_grid(to_run_config(compose(
        ["+experiment=mezo_width_sweep"])).sweep)}
    results = [r for r in load_results(SWEEP_DIR) if r["config"]["param"]["name"] == "mup"
               and r["config"]["model"]["width"] in (32, 128)
               and round(math.log2(r["config"]["optim"]["lr"]), 6) in grid]
    analysis = analyze(results)
    return {d["family"]["probes"]: d for d in analysis["drift"]}


@pytest.mark.slow
def test_mup_isotropic_optimum_stays_and_matched_probes_move_it():
    """μP, widths 32→128, seeds 0 and 1, octave grid (measured: isotropic −0.21 octave per width
    doubling, matched −0.67, and −0.11, −0.71 in a fresh rerun; the full sweep 32→256: −0.20 and
    −0.50). Isotropic probes do not need the LR ∝ 1/width of the claim (−1 per doubling) under
    μP, and matched probes do not make the optimum width-independent: they move it down further
    than isotropic probes do."""
    drift = _reduced_drift()
    isotropic, matched = drift["isotropic"], drift["matched"]
    assert isotropic["widths"] == matched["widths"] == [32, 128]
    assert not (isotropic["any_on_edge"] or matched["any_on_edge"]), "widen the LR grid"
    assert isotropic["slope"] > -0.6, isotropic
    assert matched["slope"] < isotropic["slope"], (matched, isotropic)
    assert matched["drift_octaves"] >= 0.75, matched
