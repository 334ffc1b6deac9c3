"""MeZO's gradient estimate as an optax transformation, to compose with any optax optimizer.

`optax.chain(zo_gradient(), optax.sgd(lr))` is MeZO (eager probes: for small models; the train
step of `scaling` perturbs lazily, layer by layer, at inference memory). The estimator, keys and
probes are optim/mezo.py's, so both give the same update for the same (seed, step).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optim.mezo import (
    check_plan,
    dense_plan,
    estimated_gradient,
    leaf_noise,
    perturb,
    probe_key,
    probe_losses,
    projected_gradient,
    sparse_thresholds,
    step_key,
)


class ZOGradientState(NamedTuple):
    count: jax.Array  # steps taken: the probes of step t come from (seed, t)


def zo_gradient(*, eps: float = 1e-3, n_probes: int = 1, seed: int = 0,
                plan=None) -> optax.GradientTransformationExtraArgs:
    """Replaces the incoming updates (gradients, or None) by mean_i g_i·(U/e)·z_i with
    g_i = (L(θ + εeDz_i) − L(θ − εeDz_i))/2ε, where L is the `value_fn(params)` extra argument.

    The objective may be non-differentiable. `plan` (a LeafProbe tree like the parameters) sets
    per-leaf probe, update and ε scales; by default every leaf is probed isotropically.
    """
    if eps <= 0 or n_probes < 1:
        raise ValueError(f"zo_gradient(eps={eps}, n_probes={n_probes}): expected eps > 0 and "
                         "n_probes >= 1")

    def init(params):
        del params
        return ZOGradientState(jnp.zeros([], jnp.int32))

    def update(updates, state, params=None, *, value_fn, **extra_args):
        del updates, extra_args
        if params is None:
            raise ValueError("zo_gradient needs the parameters: update(updates, state, params, "
                             "value_fn=...)")
        leaf_plan = dense_plan(params) if plan is None else plan
        check_plan(leaf_plan)
        thresholds = sparse_thresholds(params, leaf_plan, 0.0)
        key = step_key(seed, state.count)
        losses_plus, losses_minus = probe_losses(
            lambda k, scale: value_fn(perturb(params, leaf_plan, thresholds, k, scale)),
            key, n_probes, eps)
        gs = projected_gradient(losses_plus, losses_minus, eps)
        keys = [probe_key(key, i) for i in range(n_probes)]

        def one(x, probe):
            zs = [leaf_noise(k, probe, x.shape) for k in keys]
            return estimated_gradient(probe, zs, gs).astype(x.dtype)

        return jax.tree.map(one, params, leaf_plan), ZOGradientState(state.count + 1)

    return optax.GradientTransformationExtraArgs(init, update)
