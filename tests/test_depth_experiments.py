"""The depth experiment overlays compose, as their comments say to run them, into the sweeps they
describe: an LR grid over depths (and widths) at a shared base depth, so the analysis can group
the depths into one family."""

from __future__ import annotations

import itertools

import pytest

from experiments.compose import compose, precheck, sweep_points, to_run_config
from scaling.config import lr_grid


def _jobs(overrides: list[str]) -> list:
    return [to_run_config(compose(point)) for point in sweep_points(overrides)]


def test_lr_depth_sweep_under_each_depth_rule():
    """`scaling-train -m +experiment=lr_depth_sweep param=mup,depth_mup,completep`: 3 params ×
    depths 2, 4, 8, 16 × 2 seeds at one width, depth 2 the base of every run."""
    command = ["-m", "+experiment=lr_depth_sweep", "param=mup,depth_mup,completep"]
    assert precheck(command)[:3] == command  # every job validates before any starts

    jobs = _jobs(command[1:])
    assert sorted((c.param.name, c.model.depth, c.train.seed) for c in jobs) == sorted(
        itertools.product(("mup", "depth_mup", "completep"), (2, 4, 8, 16), (0, 1)))
    assert {(c.model.width, c.param.base_depth, c.train.steps, c.train.batch_size,
             c.train.seq_len) for c in jobs} == {(64, 2, 100, 8, 64)}
    assert {c.train.out_dir for c in jobs} == {"runs/lr_depth_sweep"}
    assert all(len(lr_grid(c.sweep)) == 17 for c in jobs)


@pytest.mark.parametrize("param", ["mup", "completep"])
def test_lr_width_depth_sweep_is_a_full_grid(param):
    jobs = _jobs(["+experiment=lr_width_depth_sweep", f"param={param}"])
    assert sorted((c.model.width, c.model.depth, c.train.seed) for c in jobs) == sorted(
        itertools.product((64, 128, 256), (2, 4, 8), (0, 1)))
    assert {(c.param.name, c.param.base_width, c.param.base_depth) for c in jobs} == {
        (param, 64, 2)}
    assert all(len(lr_grid(c.sweep)) >= 5 for c in jobs)
