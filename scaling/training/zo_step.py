"""MeZO's train step: 2 forward passes per probe at inference memory, then the update in place.

A step is two compiled programs. `estimate` perturbs the small unstacked leaves eagerly and the
stacked ones layer by layer inside the model's scan, run as a rolled loop
(optim.mezo.perturb_layer), so no perturbed copy of the model exists; it returns the projected
gradients g and the LR. `update` regenerates the probes and steps each stacked leaf one layer at
a time on its donated buffer. Every step's (step, g, lr) is logged, and `replay` re-applies them
with the same compiled update: the parameters come out bit for bit, without a single forward
pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import jax
import jax.numpy as jnp
from flax import nnx

from models.tagged import leaf_at
from optim.config import MeZOConfig
from optim.mezo import (
    apply_update,
    curvature,
    perturb,
    perturb_layer,
    probe_losses,
    projected_gradient,
    sparse_thresholds,
    step_key,
)
from optim.schedules import relative_schedule
from scaling.objectives import OBJECTIVES
from scaling.parametrization import Parametrization
from scaling.zeroth_order import probe_plan, stacked_names


@dataclasses.dataclass(frozen=True)
class ZOSetup:
    """What the MeZO step needs besides the state: the config, the probe plan, the seed."""

    cfg: MeZOConfig
    plan: dict
    names: dict[str, tuple]  # stacked leaf name -> its path
    seed: int
    total_steps: int

    def at_names(self, tree) -> dict:
        """The stacked leaves of a tree like the parameters, by their name in the scan."""
        return {name: leaf_at(tree, path) for name, path in self.names.items()}


def zo_setup(cfg: MeZOConfig, parametrization: Parametrization, *, total_steps: int,
             seed: int) -> ZOSetup:
    return ZOSetup(cfg, probe_plan(parametrization, cfg), stacked_names(parametrization), seed,
                   total_steps)


def init_zo_state(params, setup: ZOSetup, lr: float) -> dict:
    """The train state: parameters in optim.param_dtype, the Sparse MeZO thresholds (fixed from
    the initial weights), the curvature average and the last step's g and LR (for the log)."""
    cfg = setup.cfg
    # a copy: the update donates the state's buffers, which must not be the caller's
    params = jax.tree.map(lambda x: jnp.array(x, cfg.param_dtype), params)
    opt_state = {"count": jnp.zeros((), jnp.int32),
                 "thresholds": sparse_thresholds(params, setup.plan, cfg.sparsity),
                 "curvature_sum": jnp.zeros((), jnp.float32),  # moving average, not debiased
                 "g": jnp.zeros((cfg.n_probes,), jnp.float32),
                 "lr_used": jnp.zeros((), jnp.float32)}
    return {"params": params, "opt_state": opt_state, "lr": jnp.asarray(lr, jnp.float32),
            "loss_sum": jnp.zeros((), jnp.float32), "loss_count": jnp.zeros((), jnp.int32)}


def curvature_estimate(opt_state: dict, decay: float) -> jax.Array:
    """The debiased moving average of the Hessian-trace estimate (0 before the first step)."""
    count = opt_state["count"].astype(jnp.float32)
    return opt_state["curvature_sum"] / jnp.maximum(1.0 - decay**count, 1e-30)


def _estimate_fn(graphdef, setup: ZOSetup):
    cfg, plan = setup.cfg, setup.plan
    objective = OBJECTIVES[cfg.objective]
    relative = relative_schedule(cfg, setup.total_steps)
    names_plan = setup.at_names(plan)

    def loss(params, inputs_BxT, targets_BxT, transform=None):
        model = nnx.merge(graphdef, params)
        if transform is not None and hasattr(model, "scan_unroll"):
            # a rolled loop: unrolled, XLA computes the perturbed weights of many layers ahead
            # of the layers reading them, so the memory grew with depth (docs/performance.md)
            model.scan_unroll = 1
        logits_BxTxV = model(inputs_BxT, transform)
        return objective(logits_BxTxV.astype(jnp.float32), targets_BxT)

    def estimate(params, opt_state, lr, inputs_BxT, targets_BxT):
        thresholds, count = opt_state["thresholds"], opt_state["count"]
        layer_thresholds = setup.at_names(thresholds)

        def loss_at(key, scale):
            unstacked = perturb(params, plan, thresholds, key, scale, stacked=False)
            transform = perturb_layer(names_plan, layer_thresholds, key, scale)
            return loss(unstacked, inputs_BxT, targets_BxT, transform)

        losses_plus, losses_minus = probe_losses(loss_at, step_key(setup.seed, count),
                                                 cfg.n_probes, cfg.eps)
        gs = projected_gradient(losses_plus, losses_minus, cfg.eps)
        if cfg.clip_norm > 0:
            gs = jnp.clip(gs, -cfg.clip_norm, cfg.clip_norm)
        step_loss = jnp.mean((losses_plus + losses_minus) / 2)
        curvature_sum = opt_state["curvature_sum"]
        if cfg.curvature:
            step_loss = loss(params, inputs_BxT, targets_BxT)
            trace = jnp.mean(curvature(losses_plus, losses_minus, step_loss, cfg.eps))
            curvature_sum = cfg.curvature_decay * curvature_sum + (1 - cfg.curvature_decay) * trace
        lr_used = lr * relative(count)
        if cfg.safe_lr is not None:  # η ≤ c / trace, once the trace estimate is positive
            trace = curvature_estimate({"count": count + 1, "curvature_sum": curvature_sum},
                                       cfg.curvature_decay)
            lr_used = jnp.where(trace > 0, jnp.minimum(lr_used, cfg.safe_lr / trace), lr_used)
        return gs, lr_used.astype(jnp.float32), step_loss, curvature_sum

    return estimate


def _update_fn(setup: ZOSetup, shardings=None):
    def update(params, count, thresholds, gs, lr_used):
        params = apply_update(params, setup.plan, thresholds, step_key(setup.seed, count), gs,
                              lr_used, setup.cfg.weight_decay)
        if shardings is not None:  # on a mesh: the layout the next step was compiled for
            params = jax.lax.with_sharding_constraint(params, shardings)
        return params

    return update


def make_update(setup: ZOSetup, lrs_together: int = 1, shardings=None):
    """The compiled update (params donated), vmapped over runs trained together; `shardings`
    (a tree like the parameters) keeps them where a device mesh placed them."""
    update = _update_fn(setup, shardings)
    if lrs_together > 1:
        update = jax.vmap(update)
    return jax.jit(update, donate_argnums=0)


def make_estimate(graphdef, setup: ZOSetup, lrs_together: int = 1):
    estimate = _estimate_fn(graphdef, setup)
    if lrs_together > 1:
        estimate = jax.vmap(estimate, in_axes=(0, 0, 0, None, None))
    return jax.jit(estimate)


def make_zo_step(graphdef, setup: ZOSetup, lrs_together: int = 1, shardings=None):
    """state -> state, like make_train_step's, for optim=mezo; `shardings` as make_update's.
    On a mesh each device draws the probe entries of its own shards (JAX's partitionable
    threefry), the same numbers whatever the mesh."""
    estimate = make_estimate(graphdef, setup, lrs_together)
    update = make_update(setup, lrs_together, shardings)

    def train_step(state, inputs_BxT, targets_BxT):
        opt_state = state["opt_state"]
        gs, lr_used, loss, curvature_sum = estimate(state["params"], opt_state, state["lr"],
                                                    inputs_BxT, targets_BxT)
        params = update(state["params"], opt_state["count"], opt_state["thresholds"], gs,
                        lr_used)
        opt_state = {**opt_state, "count": opt_state["count"] + 1, "g": gs, "lr_used": lr_used,
                     "curvature_sum": curvature_sum}
        return {"params": params, "opt_state": opt_state, "lr": state["lr"],
                "loss_sum": state["loss_sum"] + loss, "loss_count": state["loss_count"] + 1}

    return train_step


def step_record(step: int, gs, lr_used) -> dict:
    """What `replay` needs of one step: its number (1-based), projected gradients and LR
    (float32 values, which JSON's doubles hold exactly)."""
    return {"step": step, "g": [float(g) for g in gs], "lr": float(lr_used)}


def replay(params, setup: ZOSetup, records: Iterable[dict]):
    """The parameters after the logged steps, from the initial ones: bit for bit the trained
    ones, since it runs the same compiled update on the same (params, step, g, lr)."""
    state = init_zo_state(params, setup, 0.0)
    params, thresholds = state["params"], state["opt_state"]["thresholds"]
    update = make_update(setup)
    for record in records:
        params = update(params, jnp.asarray(record["step"] - 1, jnp.int32), thresholds,
                        jnp.asarray(record["g"], jnp.float32),
                        jnp.asarray(record["lr"], jnp.float32))
    return params
