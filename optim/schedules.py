"""Learning-rate schedules as a relative factor in [0, 1], built from optax's schedules."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import optax

if TYPE_CHECKING:
    from optim.config import OptimizerConfig

Schedule = Literal["cosine", "wsd", "constant"]  # optim.schedule


def relative_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to 1, then cosine decay, warmup-stable-decay, or constant."""
    warmup = cfg.warmup_for(total_steps)
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=1.0, warmup_steps=warmup, decay_steps=total_steps,
            end_value=cfg.final_lr_fraction)
    if cfg.schedule == "wsd":
        decay_steps = max(1, round(cfg.decay_fraction * total_steps))
        stable_steps = max(0, total_steps - warmup - decay_steps)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, 1.0, warmup),
             optax.constant_schedule(1.0),
             optax.linear_schedule(1.0, cfg.final_lr_fraction, decay_steps)],
            boundaries=[warmup, warmup + stable_steps])
    if cfg.schedule == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, 1.0, warmup), optax.constant_schedule(1.0)],
            boundaries=[warmup])
    raise ValueError(f"optim.schedule={cfg.schedule!r}: expected cosine, wsd or constant")


def learning_rate(cfg: OptimizerConfig, total_steps: int,
                  multiplier: float = 1.0) -> optax.Schedule:
    relative = relative_schedule(cfg, total_steps)
    return lambda count: cfg.lr * multiplier * relative(count)
