"""`build_optimizer`: one optax transformation per role, composed with `optax.partition`.

The optimizer knows nothing of models or parametrizations: it receives the role label tree, the
per-role multipliers and the fan axes of the hidden matrices as plain data.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax

from optim.config import (
    OPTIMIZERS,
    AdamWConfig,
    MatrixOptimizerConfig,
    MuonConfig,
    OptimizerConfig,
)
from optim.muon import StackSharding, scale_by_muon
from optim.schedules import learning_rate
from optim.sphere import scale_to_sphere

# Roles a matrix optimizer owns; the rest go to AdamW under the parametrization's Adam rules.
MATRIX_ROLES = ("hidden",)
# Roles MuonH and AdamH keep on spheres (hidden along Muon's or Adam's direction, the readout
# along Adam's); embeddings and vectors go to AdamW.
SPHERE_ROLES = ("hidden", "output")
SPHERE_DECAY_WARNING = ("optim.weight_decay={}: applied, but on the sphere weight decay only "
                        "rescales the step by 1/(1 - lr*weight_decay), a second-order effect")
_warned: set[str] = set()


def role_of(label: str) -> str:
    """A group label is a role, optionally qualified: "vector.block" is a vector in a block."""
    return label.split(".", 1)[0]


@dataclasses.dataclass(frozen=True)
class RoleMultipliers:
    """Factors on the optimizer's base learning rate, ε and weight decay for one role."""

    lr: float = 1.0
    eps: float = 1.0
    weight_decay: float = 1.0


def _adamw(cfg: AdamWConfig, mult: RoleMultipliers, total_steps: int):
    parts = [optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps * mult.eps)]
    return parts + _decay_and_step(cfg, mult, total_steps)


def _sgd(cfg, mult: RoleMultipliers, total_steps: int):
    parts = [optax.trace(decay=cfg.momentum, nesterov=cfg.nesterov)] if cfg.momentum > 0 else []
    return parts + _decay_and_step(cfg, mult, total_steps)


def _decay_and_step(cfg: OptimizerConfig, mult: RoleMultipliers, total_steps: int):
    # LR-coupled decay: added to the update before the LR scales it (p -= lr * (u + wd * p)).
    weight_decay = cfg.weight_decay * mult.weight_decay
    decay = [optax.add_decayed_weights(weight_decay)] if weight_decay > 0 else []
    return decay + [optax.scale_by_learning_rate(learning_rate(cfg, total_steps, mult.lr))]


def ns_compute_dtype(name: str):
    """`optim.ns_dtype` as the operand dtype orthogonalize takes (None: float32)."""
    if name == "auto":  # bf16 operands where the matmul units want them
        return None if jax.default_backend() == "cpu" else jnp.bfloat16
    return None if name == "float32" else jnp.dtype(name)


def muon_transform(cfg: MatrixOptimizerConfig, matrix_axes, stack: StackSharding | None = None
                   ) -> optax.GradientTransformation:
    """The direction part of `optim=muon` / `optim=auon` for the hidden matrices in matrix_axes;
    `stack` places the orthogonalization on a mesh unless optim.ns_sharding is "compiler"."""
    common = {"momentum": cfg.momentum, "nesterov": cfg.nesterov,
              "update_scale": cfg.update_scale, "momentum_dtype": jnp.dtype(cfg.momentum_dtype),
              "bias_correction": cfg.bias_correction, "ns_backend": cfg.ns_backend,
              "stack": stack if cfg.ns_sharding == "stack" else None}
    if cfg.name == "auon":
        return scale_by_muon(matrix_axes, direction="auon_hybrid" if cfg.auon_hybrid else "auon",
                             **common)
    return scale_by_muon(
        matrix_axes, direction="newton_schulz", ns_scheme=cfg.ns_scheme, ns_steps=cfg.ns_steps,
        ns_normalization=cfg.ns_normalization, ns_method=cfg.ns_method,
        ns_dtype=ns_compute_dtype(cfg.ns_dtype), **common)


def _need_axes(cfg: OptimizerConfig, matrix_axes) -> None:
    if matrix_axes is None:
        raise ValueError(f"optim.name={cfg.name!r} needs matrix_axes: the fan axes of every "
                         "matrix it owns (a MatrixAxes tree like the parameters)")


def _sphere(cfg: AdamWConfig, role: str, mult: RoleMultipliers, total_steps: int, matrix_axes,
            stack: StackSharding | None):
    """MuonH/AdamH on one matrix role: a direction, then the relative step and retraction."""
    _need_axes(cfg, matrix_axes)
    weight_decay = cfg.weight_decay * mult.weight_decay
    if weight_decay > 0 and (message := SPHERE_DECAY_WARNING.format(weight_decay)) not in _warned:
        _warned.add(message)  # once: the optimizer is rebuilt at every trace of the train step
        warnings.warn(message, stacklevel=4)
    if role in MATRIX_ROLES and isinstance(cfg, MuonConfig):
        direction = muon_transform(cfg, matrix_axes, stack)
    else:
        direction = optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps * mult.eps)
    step = learning_rate(cfg, total_steps, mult.lr)
    return [direction, scale_to_sphere(step, matrix_axes, weight_decay=weight_decay)]


def _role_transform(cfg: OptimizerConfig, label: str, mult: RoleMultipliers, total_steps: int,
                    matrix_axes, stack: StackSharding | None):
    role = role_of(label)
    if cfg.family == "sgd":
        return _sgd(cfg, mult, total_steps)
    if cfg.family == "adam":
        return _adamw(cfg, mult, total_steps)
    if cfg.family == "sphere" and role in SPHERE_ROLES:
        return _sphere(cfg, role, mult, total_steps, matrix_axes, stack)
    if cfg.family == "muon" and role in MATRIX_ROLES:
        _need_axes(cfg, matrix_axes)
        return [muon_transform(cfg, matrix_axes, stack)] + _decay_and_step(cfg, mult, total_steps)
    adam_mult = dataclasses.replace(mult, lr=mult.lr * cfg.adam_lr_ratio)
    return _adamw(cfg, adam_mult, total_steps)


def build_optimizer(cfg: OptimizerConfig, labels, multipliers: Mapping[str, RoleMultipliers],
                    *, total_steps: int, matrix_axes=None,
                    clip_factors: Mapping[str, float] | None = None,
                    stack: StackSharding | None = None) -> optax.GradientTransformation:
    """Gradient clipping, then one transform per parameter group with its multipliers.

    `labels` is every parameter's group as a tree like the parameters: its role, optionally
    qualified ("vector.block": a vector inside a residual block, which depth rules scale apart);
    `multipliers` maps each label to its RoleMultipliers; `matrix_axes` (muon, auon, muonh,
    adamh) is a tree of MatrixAxes for the matrices they own. For muon and auon, hidden matrices
    take the matrix direction; for muonh and adamh, hidden and output matrices stay on their
    spheres; every other role takes AdamW at lr * adam_lr_ratio.

    Clipping: with `cfg.clip_scope` "global" the whole gradient is clipped to one global norm,
    with "role" each group's gradient to its own; `clip_factors` maps each label to its factor on
    `cfg.clip_norm` (None: 1 for every group; "global" needs one factor shared by all groups).
    `stack` (a device mesh's StackSharding): Muon's matrices are orthogonalized whole per device.
    """
    if cfg.family == "zeroth_order":
        raise ValueError(f"optim.name={cfg.name!r} is zeroth-order, not a gradient "
                         "transformation: train it with scaling's MeZO step, or compose "
                         "optim.zo_gradient with optax")
    if type(cfg) is not OPTIMIZERS.get(cfg.name):
        raise ValueError(f"optim.name={cfg.name!r} with a {type(cfg).__name__}: expected one of "
                         f"{ {n: c.__name__ for n, c in OPTIMIZERS.items()} }")
    missing = sorted(set(jax.tree.leaves(labels)) - set(multipliers))
    if missing:
        raise ValueError(f"multipliers: no entry for the roles {missing}")
    groups = sorted(set(jax.tree.leaves(labels)))
    thresholds = clip_thresholds(cfg, groups, clip_factors)
    per_role = {role: optax.chain(*_role_clip(cfg, thresholds[role]),
                                  *_role_transform(cfg, role, multipliers[role], total_steps,
                                                   matrix_axes, stack))
                for role in groups}
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
