"""`build_optimizer`: one optax transformation per role, composed with `optax.partition`."""

from __future__ import annotations

import optax

from optim.schedules import learning_rate
from scaling.config import OptimConfig
from scaling.parametrization import OptimizerMultipliers, Parametrization

# Which column of the rule table each optimizer reads.
FAMILY = {"adamw": "adam", "sgd": "sgd"}


def _adamw(cfg: OptimConfig, mult: OptimizerMultipliers, total_steps: int):
    parts = [optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps * mult.eps)]
    return parts + _decay_and_step(cfg, mult, total_steps)


def _sgd(cfg: OptimConfig, mult: OptimizerMultipliers, total_steps: int):
    parts = [optax.trace(decay=cfg.momentum, nesterov=cfg.nesterov)] if cfg.momentum > 0 else []
    return parts + _decay_and_step(cfg, mult, total_steps)


def _decay_and_step(cfg: OptimConfig, mult: OptimizerMultipliers, total_steps: int):
    # LR-coupled decay: added to the update before the LR scales it (p -= lr * (u + wd * p)).
    weight_decay = cfg.weight_decay * mult.weight_decay
    decay = [optax.add_decayed_weights(weight_decay)] if weight_decay > 0 else []
    return decay + [optax.scale_by_learning_rate(learning_rate(cfg, total_steps, mult.lr))]


TRANSFORMS = {"adamw": _adamw, "sgd": _sgd}


def build_optimizer(cfg: OptimConfig, parametrization: Parametrization, labels,
                    *, total_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping, then per-role transforms with the parametrization's multipliers.

    `labels` is the role tree of the parameters (models.label_tree), computed once.
    """
    if cfg.name not in TRANSFORMS:
        raise ValueError(f"optim.name={cfg.name!r}: expected one of {sorted(TRANSFORMS)}")
    multipliers = parametrization.optimizer_multipliers(FAMILY[cfg.name])
    per_role = {role: optax.chain(*TRANSFORMS[cfg.name](cfg, mult, total_steps))
                for role, mult in multipliers.items()}
    clip = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    return optax.chain(*clip, optax.partition(per_role, labels))
