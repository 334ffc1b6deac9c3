"""MeZO's step: 2 forward passes per probe at inference memory, then the update in place.

The probe plan reads the parametrization: which leaves are stacked (scanned), and the per-group
probe, update and ε scales that width-aware MeZO takes from the rule tables. A step is two
compiled programs. `estimate` perturbs the small unstacked leaves eagerly and the stacked ones
layer by layer inside the model's scan, run as a rolled loop (optim.mezo.perturb_layer), so no
perturbed copy of the model exists; it returns the projected gradients g and the LR. `update`
regenerates the probes and steps each stacked leaf one layer at a time on its donated buffer.
Every step's (step, g, lr) is logged, and `replay` re-applies them with the same compiled update:
the parameters come out bit for bit, without a single forward pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import jax
import jax.numpy as jnp
from flax import nnx

from models.tagged import LAYER_AXIS, ParamSpec, leaf_at, tree_from_paths
from optim.config import MeZOConfig
from optim.mezo import (
    LeafProbe,
    apply_update,
    check_plan,
    curvature,
    path_id,
    perturb,
    perturb_layer,
    probe_losses,
    projected_gradient,
    sparse_thresholds,
    step_key,
)
from optim.objectives import OBJECTIVES
from optim.schedules import relative_schedule
from scaling.parametrization import Parametrization, group_label
from scaling.steps.backprop import make_forward_stats
from scaling.steps.state import TrainState, over_runs


def is_stacked(spec: ParamSpec) -> bool:
    return bool(spec.logical_axes) and spec.logical_axes[0] == LAYER_AXIS


def probe_plan(parametrization: Parametrization, cfg: MeZOConfig) -> dict:
    """A LeafProbe per parameter, as a tree like the parameters.

    `matched` probe (D) or update (U) scaling is √(the group's SGD LR multiplier), so the
    expected step is SGD under the parametrization's SGD column (μP-matched under μP); the
    fan_in ε scaling is (fan_in/base_fan_in)^(−1/2); vectors take no weight decay.
    """
    multipliers = parametrization.optimizer_multipliers(cfg)
    plan = {}
    for path, spec in parametrization.specs.items():
        mult = multipliers[group_label(spec)]
        fan_in_mult = spec.fan_in / parametrization.base_specs[path].fan_in
        plan[path] = LeafProbe(
            leaf_id=path_id(path), stacked=is_stacked(spec),
            probe_scale=cfg.probe_factor(mult.lr), update_scale=cfg.update_factor(mult.lr),
            eps_scale=fan_in_mult**-0.5 if cfg.eps_scaling == "fan_in" else 1.0,
            weight_decay=0.0 if spec.role == "vector" else mult.weight_decay,
            sparse=spec.role != "vector")
    tree = tree_from_paths(plan)
    check_plan(tree)
    return tree


def stacked_names(parametrization: Parametrization) -> dict[str, tuple]:
    """Name in the model's stacked (scanned) dict -> full path, for the per-layer transform."""
    names: dict[str, tuple] = {}
    for path, spec in parametrization.specs.items():
        if is_stacked(spec):
            if path[-1] in names:
                raise ValueError(f"stacked parameters {names[path[-1]]} and {path} share the "
                                 f"name {path[-1]!r}: expected one scanned collection")
            names[path[-1]] = path
    return names


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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ZOState:
    """MeZO's optimizer state: the step count (the probes' key), the Sparse MeZO thresholds
    (fixed from the initial weights), the curvature average, and the last step's g and LR."""

    count: jax.Array
    thresholds: dict
    curvature_sum: jax.Array  # moving average, not debiased
    g: jax.Array  # one per probe
    lr_used: jax.Array  # after any safe-LR cap


def init_zo_state(params, setup: ZOSetup, lr: float) -> TrainState:
    """The train state, its parameters in optim.param_dtype."""
    cfg = setup.cfg
    # a copy: the update donates the state's buffers, which must not be the caller's
    params = jax.tree.map(lambda x: jnp.array(x, cfg.param_dtype), params)
    opt_state = ZOState(count=jnp.zeros((), jnp.int32),
                        thresholds=sparse_thresholds(params, setup.plan, cfg.sparsity),
                        curvature_sum=jnp.zeros((), jnp.float32),
                        g=jnp.zeros((cfg.n_probes,), jnp.float32),
                        lr_used=jnp.zeros((), jnp.float32))
    return TrainState.start(params, opt_state, lr)


def curvature_estimate(count: jax.Array, curvature_sum: jax.Array, decay: float) -> jax.Array:
    """The debiased moving average of the Hessian-trace estimate (0 before the first step)."""
    return curvature_sum / jnp.maximum(1.0 - decay ** count.astype(jnp.float32), 1e-30)


def clipping(gs: jax.Array, clip_norm: float) -> tuple[jax.Array, jax.Array]:
    """(whether a probe's projected gradient g was clipped, the mean factor the clip
    multiplied the probes' g by); optim.clip_norm bounds |g|."""
    if clip_norm <= 0:
        return jnp.zeros((), bool), jnp.ones((), jnp.float32)
    scales = jnp.minimum(1.0, clip_norm / jnp.maximum(jnp.abs(gs), 1e-30))
    return jnp.any(scales < 1), jnp.mean(scales)


def _estimate_fn(graphdef, setup: ZOSetup):
    cfg, plan = setup.cfg, setup.plan
    objective = OBJECTIVES[cfg.objective]
    relative = relative_schedule(cfg, setup.total_steps)
    names_plan = setup.at_names(plan)

    def loss(params, inputs_BxT, targets_BxT, transform=None):
        logits_BxTxV = nnx.merge(graphdef, params)(inputs_BxT, transform)
        return objective(logits_BxTxV.astype(jnp.float32), targets_BxT)

    def estimate(params, opt_state: ZOState, lr, inputs_BxT, targets_BxT):
        thresholds, count = opt_state.thresholds, opt_state.count
        layer_thresholds = setup.at_names(thresholds)

        def loss_at(key, scale):
            unstacked = perturb(params, plan, thresholds, key, scale, stacked=False)
            transform = perturb_layer(names_plan, layer_thresholds, key, scale)
            return loss(unstacked, inputs_BxT, targets_BxT, transform)

        losses_plus, losses_minus = probe_losses(loss_at, step_key(setup.seed, count),
                                                 cfg.n_probes, cfg.eps)
        gs = projected_gradient(losses_plus, losses_minus, cfg.eps)
        clip = clipping(gs, cfg.clip_norm)
        if cfg.clip_norm > 0:
            gs = jnp.clip(gs, -cfg.clip_norm, cfg.clip_norm)
        step_loss = jnp.mean((losses_plus + losses_minus) / 2)
        curvature_sum = opt_state.curvature_sum
        if cfg.curvature:
            step_loss = loss(params, inputs_BxT, targets_BxT)
            trace = jnp.mean(curvature(losses_plus, losses_minus, step_loss, cfg.eps))
            curvature_sum = cfg.curvature_decay * curvature_sum + (1 - cfg.curvature_decay) * trace
        lr_used = lr * relative(count)
        if cfg.safe_lr is not None:  # η ≤ c / trace, once the trace estimate is positive
            trace = curvature_estimate(count + 1, curvature_sum, cfg.curvature_decay)
            lr_used = jnp.where(trace > 0, jnp.minimum(lr_used, cfg.safe_lr / trace), lr_used)
        return gs, lr_used.astype(jnp.float32), step_loss, curvature_sum, clip

    return estimate


def _update_fn(setup: ZOSetup, shardings=None):
    def update(params, count, thresholds, gs, lr_used):
        params = apply_update(params, setup.plan, thresholds, step_key(setup.seed, count), gs,
                              lr_used, setup.cfg.weight_decay)
        if shardings is not None:  # on a mesh: the layout the next step was compiled for
            params = jax.lax.with_sharding_constraint(params, shardings)
        return params

    return update


def make_update(setup: ZOSetup, runs: int | None = None, shardings=None):
    """The compiled update (params donated), vmapped over `runs` stacked runs (None: one);
    `shardings` (a tree like the parameters) keeps them where a device mesh placed them."""
    return jax.jit(over_runs(_update_fn(setup, shardings), runs, (0,) * 5), donate_argnums=0)


def make_estimate(graphdef, setup: ZOSetup, runs: int | None = None):
    return jax.jit(over_runs(_estimate_fn(graphdef, setup), runs, (0, 0, 0, None, None)))


def make_zo_step(graphdef, setup: ZOSetup, runs: int | None = None, shardings=None):
    """(state, inputs, targets) -> state, like make_train_step's, for optim=mezo; `shardings`
    as make_update's. On a mesh each device draws the probe entries of its own shards (JAX's
    partitionable threefry), the same numbers whatever the mesh."""
    estimate = make_estimate(graphdef, setup, runs)
    update = make_update(setup, runs, shardings)

    def train_step(state: TrainState, inputs_BxT, targets_BxT) -> TrainState:
        opt_state: ZOState = state.opt_state
        gs, lr_used, loss, curvature_sum, (clipped, scale) = estimate(
            state.params, opt_state, state.lr, inputs_BxT, targets_BxT)
        params = update(state.params, opt_state.count, opt_state.thresholds, gs, lr_used)
        opt_state = dataclasses.replace(opt_state, count=opt_state.count + 1, g=gs,
                                        lr_used=lr_used, curvature_sum=curvature_sum)
        return state.counted(loss, clipped, scale, params=params, opt_state=opt_state)

    return train_step


def step_record(step: int, gs, lr_used) -> dict:
    """What `replay` needs of one step: its number (1-based), projected gradients and LR
    (float32 values, which JSON's doubles hold exactly)."""
    return {"step": step, "g": [float(g) for g in gs], "lr": float(lr_used)}


def replay(params, setup: ZOSetup, records: Iterable[dict]):
    """The parameters after the logged steps, from the initial ones: bit for bit the trained
    ones, since it runs the training's compiled update (one run of a stack) on the same
    (params, step, g, lr)."""
    state = TrainState.stack([init_zo_state(params, setup, 0.0)])
    params, thresholds = state.params, state.opt_state.thresholds
    update = make_update(setup, runs=1)
    for record in records:
        params = update(params, jnp.asarray([record["step"] - 1], jnp.int32), thresholds,
                        jnp.asarray([record["g"]], jnp.float32),
                        jnp.asarray([record["lr"]], jnp.float32))
    return jax.tree.map(lambda x: x[0], params)


class ZerothOrderStep:
    """One compiled MeZO step of `runs` runs stacked (None: one), the step kind of optim=mezo.
    It logs every step's (step, g, lr) to LOG_NAME, for replay; each logged record has the LR
    it applied (after any safe-LR cap), the curvature estimate when it keeps one, and, with
    `indicators`, the model's forward stats by one more forward pass."""

    log_name = "zo_steps.jsonl"
    metric_names: tuple[str, ...] = ("lr", "curvature")  # metrics, not indicators

    def __init__(self, cfg: MeZOConfig, parametrization: Parametrization, graphdef, *,
                 total_steps: int, runs: int | None = None, indicators: bool = True,
                 shardings=None, stack=None, seed: int = 0, grad_accum: int = 1):
        del stack  # nothing to orthogonalize
        if grad_accum != 1:  # validate() says so in the config's words first
            raise ValueError(f"grad_accum={grad_accum}: a zeroth-order step takes no gradient")
        self.cfg, self.runs = cfg, runs
        self.setup = zo_setup(cfg, parametrization, total_steps=total_steps, seed=seed)
        self._step = make_zo_step(graphdef, self.setup, runs,
                                  None if shardings is None else shardings.params)
        self._forward_stats = make_forward_stats(graphdef, runs) if indicators else None

    def init_state(self, params, lr: float) -> TrainState:
        return init_zo_state(params, self.setup, lr)

    def __call__(self, state: TrainState, inputs_BxT, targets_BxT):
        return self._step(state, inputs_BxT, targets_BxT), {}

    def compile(self, state, inputs_BxT, targets_BxT) -> None:
        """Nothing ahead: the step is two programs (estimate, update), each compiled at its first
        call; it holds a forward's activations at most, as inference does."""
        del state, inputs_BxT, targets_BxT

    def _per_run(self, values) -> list:
        return [values] if self.runs is None else list(values)

    def step_records(self, state: TrainState, step: int) -> list[dict]:
        gs, lrs = jax.device_get((state.opt_state.g, state.opt_state.lr_used))
        return [step_record(step, g, lr)
                for g, lr in zip(self._per_run(gs), self._per_run(lrs), strict=True)]

    def log_values(self, state: TrainState, inputs_BxT, measured: dict) -> dict:
        opt_state = state.opt_state
        values = {"lr": opt_state.lr_used}
        if self.cfg.curvature:  # the Hessian-trace estimate's moving average
            values["curvature"] = curvature_estimate(opt_state.count, opt_state.curvature_sum,
                                                     self.cfg.curvature_decay)
        if self._forward_stats is not None:
            values |= self._forward_stats(state.params, inputs_BxT)
        return values
