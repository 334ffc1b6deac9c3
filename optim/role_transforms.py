"""The pieces an optimizer family chains for one parameter group: a direction (Adam's, SGD's
momentum, Muon's orthogonalized momentum), then LR-coupled weight decay and the scheduled step,
or a relative step and retraction on the sphere. Each family's config picks its pieces."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import optax

from optim.schedules import learning_rate
from optim.sphere import scale_to_sphere

if TYPE_CHECKING:
    from optim.build import RoleMultipliers
    from optim.config import AdamWConfig, OptimizerConfig, SGDConfig

SPHERE_DECAY_WARNING = ("optim.weight_decay={}: applied, but on the sphere weight decay only "
                        "rescales the step by 1/(1 - lr*weight_decay), a second-order effect")
_warned: set[str] = set()


def adam_direction(cfg: AdamWConfig, mult: RoleMultipliers) -> optax.GradientTransformation:
    return optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps * mult.eps)


def momentum_direction(cfg: SGDConfig) -> list[optax.GradientTransformation]:
    return [optax.trace(decay=cfg.momentum, nesterov=cfg.nesterov)] if cfg.momentum > 0 else []


def decay_and_step(cfg: OptimizerConfig, mult: RoleMultipliers, total_steps: int
                   ) -> list[optax.GradientTransformation]:
    """LR-coupled decay, added to the update before the LR scales it (p -= lr * (u + wd * p))."""
    weight_decay = cfg.weight_decay * mult.weight_decay
    decay = [optax.add_decayed_weights(weight_decay)] if weight_decay > 0 else []
    return decay + [optax.scale_by_learning_rate(learning_rate(cfg, total_steps, mult.lr))]


def on_sphere(cfg: OptimizerConfig, direction: optax.GradientTransformation,
              mult: RoleMultipliers, total_steps: int, matrix_axes, direction_norm=None
              ) -> list[optax.GradientTransformation]:
    """MuonH/AdamH on one matrix group: the direction, then the relative step and retraction."""
    weight_decay = cfg.weight_decay * mult.weight_decay
    if weight_decay > 0 and (message := SPHERE_DECAY_WARNING.format(weight_decay)) not in _warned:
        _warned.add(message)  # once: the optimizer is rebuilt at every trace of the train step
        warnings.warn(message, stacklevel=4)
    step = learning_rate(cfg, total_steps, mult.lr)
    return [direction, scale_to_sphere(step, matrix_axes, weight_decay=weight_decay,
                                       direction_norm=direction_norm)]


def ns_compute_dtype(name: str):
    """`optim.ns_dtype` as the operand dtype orthogonalize takes (None: float32)."""
    if name == "auto":  # bf16 operands where the matmul units want them
        return None if jax.default_backend() == "cpu" else jnp.bfloat16
    return None if name == "float32" else jnp.dtype(name)


def need_axes(name: str, matrix_axes) -> None:
    if matrix_axes is None:
        raise ValueError(f"optim.name={name!r} needs matrix_axes: the fan axes of every "
                         "matrix it owns (a MatrixAxes tree like the parameters)")
