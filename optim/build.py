"""`build_optimizer`: one optax transformation per role, composed with `optax.partition`."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from models.tagged import tree_from_paths
from optim.muon import MatrixAxes, scale_by_muon
from optim.schedules import learning_rate
from scaling.config import OptimConfig
from scaling.parametrization import OptimizerMultipliers, Parametrization

# Which column of the rule table each optimizer reads.
FAMILY = {"adamw": "adam", "sgd": "sgd", "muon": "muon", "auon": "muon"}
# Roles a matrix optimizer owns; the rest go to AdamW under the parametrization's Adam rules.
MATRIX_ROLES = ("hidden",)


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


def ns_compute_dtype(name: str):
    """`optim.ns_dtype` as the operand dtype orthogonalize takes (None: float32)."""
    if name == "auto":  # bf16 operands where the matmul units want them
        return None if jax.default_backend() == "cpu" else jnp.bfloat16
    return None if name == "float32" else jnp.dtype(name)


def muon_transform(cfg: OptimConfig, matrix_axes) -> optax.GradientTransformation:
    """The direction part of `optim=muon` / `optim=auon` for the hidden matrices in matrix_axes."""
    direction = ("newton_schulz" if cfg.name == "muon"
                 else "auon_hybrid" if cfg.auon_hybrid else "auon")
    return scale_by_muon(
        matrix_axes, momentum=cfg.momentum, nesterov=cfg.nesterov,
        update_scale=cfg.update_scale, direction=direction, ns_scheme=cfg.ns_scheme,
        ns_steps=cfg.ns_steps, ns_normalization=cfg.ns_normalization, ns_method=cfg.ns_method,
        ns_dtype=ns_compute_dtype(cfg.ns_dtype), momentum_dtype=jnp.dtype(cfg.momentum_dtype),
        bias_correction=cfg.bias_correction, ns_backend=cfg.ns_backend)


def matrix_axes(parametrization: Parametrization) -> dict:
    """Fan axes of every hidden matrix, as a (partial) tree like the parameters."""
    return tree_from_paths({path: MatrixAxes(spec.fan_in_axes, spec.fan_out_axes)
                            for path, spec in parametrization.specs.items()
                            if spec.role in MATRIX_ROLES})


def _role_transform(cfg: OptimConfig, role: str, mult: OptimizerMultipliers, total_steps: int,
                    parametrization: Parametrization):
    if cfg.name == "adamw":
        return _adamw(cfg, mult, total_steps)
    if cfg.name == "sgd":
        return _sgd(cfg, mult, total_steps)
    if role in MATRIX_ROLES:
        return [muon_transform(cfg, matrix_axes(parametrization))] + _decay_and_step(
            cfg, mult, total_steps)
    adam_mult = dataclasses.replace(mult, lr=mult.lr * cfg.adam_lr_ratio)
    return _adamw(cfg, adam_mult, total_steps)


def build_optimizer(cfg: OptimConfig, parametrization: Parametrization, labels,
                    *, total_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping, then per-role transforms with the parametrization's multipliers.

    `labels` is the role tree of the parameters (models.label_tree), computed once. For muon and
    auon, hidden matrices take the Muon direction and every other role AdamW.
    """
    if cfg.name not in FAMILY:
        raise ValueError(f"optim.name={cfg.name!r}: expected one of {sorted(FAMILY)}")
    multipliers = parametrization.optimizer_multipliers(
        FAMILY[cfg.name], update_scale=cfg.update_scale,
        wd_width_exponent=cfg.wd_width_exponent)
    per_role = {role: optax.chain(*_role_transform(cfg, role, mult, total_steps,
                                                   parametrization))
                for role, mult in multipliers.items()}
    clip = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    return optax.chain(*clip, optax.partition(per_role, labels))
