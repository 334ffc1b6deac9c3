"""`build_optimizer`: one optax transformation per role, composed with `optax.partition`.

The optimizer knows nothing of models or parametrizations: it receives the role label tree, the
per-role multipliers and the fan axes of the hidden matrices as plain data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import optax

from optim.config import OPTIMIZERS, OptimizerConfig
from optim.stack import StackSharding


def role_of(label: str) -> str:
    """A group label is a role, optionally qualified: "vector.block" is a vector in a block."""
    return label.split(".", 1)[0]


@dataclasses.dataclass(frozen=True)
class RoleMultipliers:
    """Factors on the optimizer's base learning rate, ε and weight decay for one role."""

    lr: float = 1.0
    eps: float = 1.0
    weight_decay: float = 1.0


def build_optimizer(cfg: OptimizerConfig, labels, multipliers: Mapping[str, RoleMultipliers],
                    *, total_steps: int, matrix_axes=None,
                    clip_factors: Mapping[str, float] | None = None,
                    stack: StackSharding | None = None) -> optax.GradientTransformation:
    """Gradient clipping, then one transform per parameter group with its multipliers: each
    the chain `cfg.role_transform` builds for the group's role.

    `labels` is every parameter's group as a tree like the parameters: its role, optionally
    qualified ("vector.block": a vector inside a residual block, which depth rules scale apart);
    `multipliers` maps each label to its RoleMultipliers; `matrix_axes` is a tree of MatrixAxes
    for the matrices the family steps as matrices or keeps on spheres (`cfg.matrix_roles`,
    `cfg.sphere_roles`).

    Clipping: with `cfg.clip_scope` "global" the whole gradient is clipped to one global norm,
    with "role" each group's gradient to its own; `clip_factors` maps each label to its factor on
    `cfg.clip_norm` (None: 1 for every group; "global" needs one factor shared by all groups).
    `stack` (a device mesh's StackSharding): Muon's matrices are orthogonalized whole per device.
    """
    if type(cfg) is not OPTIMIZERS.get(cfg.name):
        raise ValueError(f"optim.name={cfg.name!r} with a {type(cfg).__name__}: expected one of "
                         f"{ {n: c.__name__ for n, c in OPTIMIZERS.items()} }")
    missing = sorted(set(jax.tree.leaves(labels)) - set(multipliers))
    if missing:
        raise ValueError(f"multipliers: no entry for the roles {missing}")
    groups = sorted(set(jax.tree.leaves(labels)))
    thresholds = clip_thresholds(cfg, groups, clip_factors)
    per_role = {label: optax.chain(*_role_clip(cfg, thresholds[label]),
                                   *cfg.role_transform(role_of(label), multipliers[label],
                                                       total_steps, matrix_axes=matrix_axes,
                                                       stack=stack))
                for label in groups}
    clip = _global_clip(cfg, thresholds)
    return optax.chain(*clip, optax.partition(per_role, labels))


def clip_thresholds(cfg: OptimizerConfig, groups, clip_factors: Mapping[str, float] | None
                    ) -> dict[str, float]:
    """Each group's clipping threshold: `cfg.clip_norm` times its factor (0: no clipping)."""
    if cfg.clip_scope not in ("global", "role"):
        raise ValueError(f"optim.clip_scope={cfg.clip_scope!r}: expected 'global' or 'role'")
    factors = {group: 1.0 for group in groups} if clip_factors is None else dict(clip_factors)
    missing = sorted(set(groups) - set(factors))
    if missing:
        raise ValueError(f"clip_factors: no entry for the roles {missing}")
    if any(not factors[group] > 0 for group in groups):
        raise ValueError(f"clip_factors={factors}: expected a positive factor for every group")
    if cfg.clip_scope == "global" and len({factors[group] for group in groups}) > 1:
        raise ValueError(f"clip_factors={factors}: optim.clip_scope='global' clips one norm, so "
                         "every group needs the same factor (per-group factors need "
                         "clip_scope='role')")
    return {group: cfg.clip_norm * factors[group] for group in groups}


def _global_clip(cfg: OptimizerConfig, thresholds: dict[str, float]) -> list:
    threshold = next(iter(thresholds.values()))
    if cfg.clip_scope != "global" or threshold <= 0:
        return []
    return [optax.clip_by_global_norm(threshold)]


def _role_clip(cfg: OptimizerConfig, threshold: float) -> list:
    """Inside the partition a transform sees only its group's leaves: their own global norm."""
    if cfg.clip_scope != "role" or threshold <= 0:
        return []
    return [optax.clip_by_global_norm(threshold)]
