"""The dataclass defaults (library use) and the Hydra defaults (CLI use) describe one run."""

from __future__ import annotations

import math

from experiments.compose import compose, to_run_config
from optim import AdamWConfig, relative_schedule
from scaling.config import RunConfig


def test_hydra_defaults_equal_dataclass_defaults():
    """`scaling-train` with no overrides trains exactly `RunConfig()`."""
    assert to_run_config(compose([])) == RunConfig()


def test_default_mup_is_active():
    """The default base width is below the default width, so μP changes something by default."""
    cfg = RunConfig()
    assert cfg.param.name == "mup" and cfg.param.base_width < cfg.model.width


def test_schedules_warm_up_then_decay_to_the_final_fraction():
    """cosine and wsd rise linearly to 1 and end at final_lr_fraction; constant stays at 1."""
    steps = 100
    for schedule in ("cosine", "wsd", "constant"):
        cfg = AdamWConfig(schedule=schedule, warmup_steps=10, final_lr_fraction=0.1,
                          decay_fraction=0.2)
        f = relative_schedule(cfg, steps)
        assert float(f(0)) == 0.0 and math.isclose(float(f(5)), 0.5, rel_tol=1e-6)
        assert math.isclose(float(f(10)), 1.0, rel_tol=1e-6)
        end = 1.0 if schedule == "constant" else 0.1
        assert math.isclose(float(f(steps)), end, rel_tol=1e-5), schedule
    wsd = relative_schedule(AdamWConfig(schedule="wsd", warmup_steps=10, decay_fraction=0.2), steps)
    assert float(wsd(79)) == 1.0 and float(wsd(90)) < 1.0  # stable until the last 20% of steps
