"""One training step and evaluation as pure, jitted functions of a train state."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from optim import OptimizerConfig
from optim.build import clip_thresholds
from scaling.parametrization import build_optimizer


def next_token_loss(graphdef, params, inputs_BxT, targets_BxT) -> jax.Array:
    return next_token_loss_and_stats(graphdef, params, inputs_BxT, targets_BxT)[0]


def next_token_loss_and_stats(graphdef, params, inputs_BxT, targets_BxT):
    """(loss, the model's forward stats); unused stats cost nothing under jit."""
    logits_BxTxV, stats = nnx.merge(graphdef, params).forward(inputs_BxT)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV.astype(jnp.float32),
                                                           targets_BxT).mean()
    return loss, stats


# lr -> the optimizer at that base LR; built inside the traced step, so lr may be a tracer
OptimizerAt = Callable[[jax.Array | float], optax.GradientTransformation]


@dataclasses.dataclass(frozen=True)
class Measure:
    """What a measured train step reports besides the new state: always the gradient's global
    norm before clipping and the clip factor the optimizer applies (summed over the steps
    between logs in the state; with per-group clipping, the smallest group's factor, and each
    group's as 'clip_scale/<group>'); with `indicators`, the model's forward stats and the
    update/weight RMS ratio of every parameter group."""

    labels: dict  # every parameter's group label, a tree like the parameters (group_label)
    # the clipping threshold: one number for a global clip (optim.clip_norm; 0: none), or
    # group -> threshold for optim.clip_scope=role (optim.build.clip_thresholds)
    clip: float | dict[str, float]
    indicators: bool = True


def clip_of(cfg: OptimizerConfig, parametrization) -> float | dict[str, float]:
    """Measure.clip of the optimizer `cfg` builds: its global threshold, or every group's
    threshold under optim.clip_scope=role."""
    groups = sorted(set(jax.tree.leaves(parametrization.labels())))
    thresholds = clip_thresholds(cfg, groups, parametrization.clip_factors(cfg))
    return thresholds if cfg.clip_scope == "role" else next(iter(thresholds.values()))


def clip_scale(grad_norm: jax.Array, clip_norm: float) -> jax.Array:
    """min(1, clip_norm / ‖g‖): the factor global-norm clipping multiplies the gradient by."""
    if clip_norm <= 0:
        return jnp.ones_like(grad_norm)
    return jnp.minimum(1.0, clip_norm / grad_norm)


def _group_norms(tree, labels: dict) -> dict[str, jax.Array]:
    """Each group's global norm over its parameters."""
    squares: dict[str, jax.Array] = {}
    for label, x in zip(jax.tree.leaves(labels), jax.tree.leaves(tree), strict=True):
        squares[label] = squares.get(label, 0.0) + jnp.sum(jnp.square(x))
    return {label: jnp.sqrt(total) for label, total in squares.items()}


def update_ratios(updates, params, labels: dict) -> dict[str, jax.Array]:
    """‖update‖ / ‖weight‖ over each group's parameters (= the ratio of their RMS), weights
    before the update; 'update_ratio/<group>'."""
    weights = _group_norms(params, labels)
    return {f"update_ratio/{label}": norm / weights[label]
            for label, norm in _group_norms(updates, labels).items()}


def clip_scales(grads, grad_norm: jax.Array, measure: Measure
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(the clip factor, per-group factors when each group is clipped alone)."""
    if not isinstance(measure.clip, dict):
        return clip_scale(grad_norm, measure.clip), {}
    per_group = {label: clip_scale(norm, measure.clip[label])
                 for label, norm in _group_norms(grads, measure.labels).items()}
    return (jnp.min(jnp.stack(list(per_group.values()))),
            {f"clip_scale/{label}": s for label, s in per_group.items()})


def make_train_step(graphdef, tx_at: OptimizerAt, lrs_together: int = 1,
                    measure: Measure | None = None, shardings=None):
    """state -> state, with the optimizer `tx_at(state["lr"])`; with `measure`,
    state -> (state, measured): what Measure lists, of this step.

    The LR lives in the state so that one compiled program trains several LRs (vmap over the
    state when `lrs_together` > 1) exactly as it trains one; the optimizer is built from it
    inside the step, because a relative (sphere) step is not linear in the LR. The state also
    carries a running loss sum, so logged means survive resumes. Measuring only reads the
    gradients, updates and activations: the new state is the unmeasured step's, bit for bit.
    `shardings` (a tree like the state): on a device mesh, where the new state is kept, so
    every step compiles and runs with the same layout.
    """
    forward_stats = measure is not None and measure.indicators

    def train_step(state, inputs_BxT, targets_BxT):
        params = state["params"]
        (loss, stats), grads = jax.value_and_grad(
            lambda p: next_token_loss_and_stats(graphdef, p, inputs_BxT, targets_BxT),
            has_aux=True)(params)
        updates, opt_state = tx_at(state["lr"]).update(grads, state["opt_state"], params)
        new_state = {**state, "params": optax.apply_updates(params, updates),
                     "opt_state": opt_state, "loss_sum": state["loss_sum"] + loss,
                     "loss_count": state["loss_count"] + 1}
        if shardings is not None:  # under vmap, each run's slice is laid out like one run
            new_state = jax.lax.with_sharding_constraint(new_state, shardings)
        if measure is None:
            return new_state
        grad_norm = optax.global_norm(grads)
        scale, group_scales = clip_scales(grads, grad_norm, measure)
        new_state["clipped_sum"] = state["clipped_sum"] + (scale < 1).astype(jnp.float32)
        new_state["clip_scale_sum"] = state["clip_scale_sum"] + scale
        measured = {"grad_norm": grad_norm, "clip_scale": scale, **group_scales}
        if forward_stats:
            measured |= stats | update_ratios(updates, params, measure.labels)
        return new_state, measured

    if lrs_together > 1:
        train_step = jax.vmap(train_step, in_axes=(0, None, None))
    return jax.jit(train_step, donate_argnums=0)


def make_forward_stats(graphdef, lrs_together: int = 1):
    """(params, inputs_BxT) -> the model's forward stats: the indicators of a step that takes
    no gradient (MeZO), by one more forward pass."""
    stats = lambda params, inputs_BxT: nnx.merge(graphdef, params).forward(inputs_BxT)[1]
    if lrs_together > 1:
        stats = jax.vmap(stats, in_axes=(0, None))
    return jax.jit(stats)


def optimizer_at(cfg: OptimizerConfig, parametrization, *, total_steps: int,
                 stack=None) -> OptimizerAt:
    """The optimizer make_train_step expects: `cfg` at any base LR, traced or not; `stack`:
    Muon's placement on a device mesh (scaling.sharding.Layout.stack)."""
    return lambda lr: build_optimizer(dataclasses.replace(cfg, lr=lr), parametrization,
                                      total_steps=total_steps, stack=stack)


def init_train_state(params, tx_at: OptimizerAt, lr: float, measure: bool = False) -> dict:
    """The optimizer state does not depend on the LR, so one template serves every LR.
    `measure`: the state of a measured step, which also sums the clipping between logs."""
    state = {"params": params, "opt_state": tx_at(lr).init(params),
             "lr": jnp.asarray(lr, jnp.float32),
             "loss_sum": jnp.zeros((), jnp.float32), "loss_count": jnp.zeros((), jnp.int32)}
    if measure:
        state |= {"clipped_sum": jnp.zeros((), jnp.float32),
                  "clip_scale_sum": jnp.zeros((), jnp.float32)}
    return state


def make_eval(graphdef, batches, lrs_together: int = 1):
    """params -> one validation loss per LR trained together."""
    loss_fn = lambda p, x, y: next_token_loss(graphdef, p, x, y)
    if lrs_together > 1:
        loss_fn = jax.vmap(loss_fn, in_axes=(0, None, None))
    loss_fn = jax.jit(loss_fn)
    return lambda params: np.mean([np.atleast_1d(loss_fn(params, x, y)) for x, y in batches],
                                  axis=0).tolist()


def flops_per_token(model: nnx.Module, specs, seq_len: int) -> float:
    """6 FLOPs per non-embedding parameter plus the model's attention term (Kaplan et al.)."""
    n = sum(math.prod(s.shape) for s in specs.values() if s.role != "input")
    return 6.0 * n + model.attention_flops_per_token(seq_len)
