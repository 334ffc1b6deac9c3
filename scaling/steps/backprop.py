"""The backprop step: the gradient of the loss, then the optimizer, as one jitted function of a
train state; with what it measured on the way (gradient norm, clip factor, indicators)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from models.tagged import tree_from_paths
from optim import OptimizerConfig
from optim.build import clip_thresholds
from optim.muon import orthogonalized, rank_fraction
from optim.trees import MatrixAxes, path_key
from scaling.parametrization import Parametrization, build_optimizer
from scaling.steps.loss import next_token_loss_and_stats
from scaling.steps.state import TrainState, over_runs

# lr -> the optimizer at that base LR; built inside the traced step, so lr may be a tracer
OptimizerAt = Callable[[jax.Array | float], optax.GradientTransformation]


@dataclasses.dataclass(frozen=True)
class Measure:
    """What a backprop step reports besides the new state: always the gradient's global norm
    before clipping and the clip factor the optimizer applies (summed over the steps between
    logs in the state; with per-group clipping, the smallest group's factor, and each group's
    as 'clip_scale/<group>'); with `indicators`, the model's forward stats and the
    update/weight RMS ratio of every parameter group, and with `orthogonal` (a matrix
    optimizer's direction and the fan axes of the matrices it steps) the rank fraction of each
    such matrix's orthogonalized gradient."""

    labels: dict  # every parameter's group label, a tree like the parameters (group_label)
    # the clipping threshold: one number for a global clip (optim.clip_norm; 0: none), or
    # group -> threshold for optim.clip_scope=role (optim.build.clip_thresholds)
    clip: float | dict[str, float]
    indicators: bool = True
    orthogonal: tuple[Callable, dict] | None = None  # (direction fn, {path: MatrixAxes})

    @classmethod
    def of(cls, cfg: OptimizerConfig, parametrization: Parametrization,
           indicators: bool = True) -> Measure:
        """What the optimizer `cfg` clips, as it builds its clipping under this table."""
        labels = parametrization.labels()
        groups = sorted(set(jax.tree.leaves(labels)))
        thresholds = clip_thresholds(cfg, groups, parametrization.clip_factors(cfg))
        clip = thresholds if cfg.clip_scope == "role" else next(iter(thresholds.values()))
        direction = cfg.bare_direction()
        axes = {path: MatrixAxes(spec.fan_in_axes, spec.fan_out_axes)
                for path, spec in parametrization.specs.items() if spec.role in cfg.matrix_roles}
        orthogonal = (direction, axes) if direction is not None and axes else None
        return cls(labels, clip, indicators, orthogonal)


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


def orth_ranks(grads, orthogonal: tuple[Callable, dict]) -> dict[str, jax.Array]:
    """'orth_rank/<parameter>[/<layer>]': ‖O‖_F² / min(fan_in, fan_out) of the direction O of
    each matrix's gradient (1: full rank; the share of directions a rank-limited update
    fills, which a sphere step divided by ‖O‖_F spreads its fixed length over)."""
    direction, axes = orthogonal
    flat = {path_key(path): g for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]}
    matrices = {path: flat[path] for path in axes}
    directions = orthogonalized(tree_from_paths(matrices), tree_from_paths(axes), direction)
    out = {}
    for path, o in jax.tree_util.tree_flatten_with_path(directions)[0]:
        key = path_key(path)
        name = "orth_rank/" + "/".join(map(str, key))
        fraction = rank_fraction(o, axes[key]).reshape(-1)
        out |= ({name: fraction[0]} if fraction.size == 1 and o.ndim == 2 else
                {f"{name}/{i}": f for i, f in enumerate(fraction)})
    return out


def clip_scales(grads, grad_norm: jax.Array, measure: Measure
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(the clip factor, per-group factors when each group is clipped alone)."""
    if not isinstance(measure.clip, dict):
        return clip_scale(grad_norm, measure.clip), {}
    per_group = {label: clip_scale(norm, measure.clip[label])
                 for label, norm in _group_norms(grads, measure.labels).items()}
    return (jnp.min(jnp.stack(list(per_group.values()))),
            {f"clip_scale/{label}": s for label, s in per_group.items()})


def optimizer_at(cfg: OptimizerConfig, parametrization: Parametrization, *, total_steps: int,
                 stack=None) -> OptimizerAt:
    """The optimizer make_train_step expects: `cfg` at any base LR, traced or not; `stack`:
    Muon's placement on a device mesh (scaling.sharding.Layout.stack)."""
    return lambda lr: build_optimizer(dataclasses.replace(cfg, lr=lr), parametrization,
                                      total_steps=total_steps, stack=stack)


def init_train_state(params, tx_at: OptimizerAt, lr: float) -> TrainState:
    """The optimizer state does not depend on the LR, so one template serves every LR."""
    return TrainState.start(params, tx_at(lr).init(params), lr)


def micro_batches(x_BxT: jax.Array, grad_accum: int) -> jax.Array:
    """The batch as `grad_accum` micro-batches (KxB/KxT), micro-batch j taking rows j, j+K, ...:
    every device's block of rows (on a mesh) feeds every micro-batch, so none waits idle."""
    batch, *rest = x_BxT.shape
    return jnp.swapaxes(x_BxT.reshape(batch // grad_accum, grad_accum, *rest), 0, 1)


def accumulated(loss_and_grad, grad_accum: int):
    """loss_and_grad(params, inputs, targets) -> ((loss, stats), grads) over the whole batch,
    taken over `grad_accum` equal micro-batches one at a time and averaged: the gradient of the
    full batch's mean loss, with one micro-batch's activations alive at once (the forward stats:
    the mean of the micro-batches')."""
    if grad_accum == 1:
        return loss_and_grad

    def over_micro_batches(params, inputs_BxT, targets_BxT):
        parts = (micro_batches(inputs_BxT, grad_accum), micro_batches(targets_BxT, grad_accum))
        shapes = jax.eval_shape(loss_and_grad, params, *(x[0] for x in parts))
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

        def add_one(total, micro):
            return jax.tree.map(jnp.add, total, loss_and_grad(params, *micro)), None

        total, _ = jax.lax.scan(add_one, zeros, parts)
        return jax.tree.map(lambda x: x / grad_accum, total)

    return over_micro_batches


def make_train_step(graphdef, tx_at: OptimizerAt, measure: Measure, runs: int | None = None,
                    shardings=None, grad_accum: int = 1):
    """(state, inputs, targets) -> (state, measured), with the optimizer `tx_at(state.lr)`;
    measured: what `measure` lists, of this step.

    The LR lives in the state so that one compiled program trains several LRs (`runs`: the
    states stacked on a leading axis, vmapped; None: one state) exactly as it trains one; the
    optimizer is built from it inside the step, because a relative (sphere) step is not
    linear in the LR. Measuring only reads the gradients, updates and activations: the new
    state is the unmeasured step's, bit for bit. `shardings` (a tree like one run's state): on
    a device mesh, where the new state is kept, so every step compiles and runs with the same
    layout. `grad_accum`: the batch's gradient summed over that many micro-batches (accumulated).
    The state is donated.
    """
    loss_and_grad = accumulated(jax.value_and_grad(
        lambda p, x_BxT, y_BxT: next_token_loss_and_stats(graphdef, p, x_BxT, y_BxT),
        has_aux=True), grad_accum)

    def train_step(state: TrainState, inputs_BxT, targets_BxT):
        params = state.params
        (loss, stats), grads = loss_and_grad(params, inputs_BxT, targets_BxT)
        updates, opt_state = tx_at(state.lr).update(grads, state.opt_state, params)
        grad_norm = optax.global_norm(grads)
        scale, group_scales = clip_scales(grads, grad_norm, measure)
        new_state = state.counted(loss, scale < 1, scale, opt_state=opt_state,
                                  params=optax.apply_updates(params, updates))
        if shardings is not None:  # under vmap, each run's slice is laid out like one run
            new_state = jax.lax.with_sharding_constraint(new_state, shardings)
        measured = {"grad_norm": grad_norm, "clip_scale": scale, **group_scales}
        if measure.indicators:
            measured |= stats | update_ratios(updates, params, measure.labels)
            if measure.orthogonal is not None:
                measured |= orth_ranks(grads, measure.orthogonal)
        return new_state, measured

    return jax.jit(over_runs(train_step, runs, (0, None, None)), donate_argnums=0)


def make_forward_stats(graphdef, runs: int | None = None):
    """(params, inputs_BxT) -> the model's forward stats, by one more forward pass: the
    indicators of a step that takes no gradient (MeZO)."""
    stats = lambda params, inputs_BxT: nnx.merge(graphdef, params).forward(inputs_BxT)[1]
    return jax.jit(over_runs(stats, runs, (0, None)))


class BackpropStep:
    """One compiled backprop step of `runs` runs stacked (None: one unstacked run), measuring
    what Measure lists; the step kind of every optimizer that needs a gradient."""

    log_name = None  # no log of its own beside metrics.jsonl
    metric_names: tuple[str, ...] = ()  # everything it measures is an indicator

    def __init__(self, cfg: OptimizerConfig, parametrization: Parametrization, graphdef, *,
                 total_steps: int, runs: int | None = None, indicators: bool = True,
                 shardings=None, stack=None, seed: int = 0, grad_accum: int = 1):
        del seed  # a backprop step draws nothing
        self.tx_at = optimizer_at(cfg, parametrization, total_steps=total_steps, stack=stack)
        self._step = make_train_step(graphdef, self.tx_at,
                                     Measure.of(cfg, parametrization, indicators), runs,
                                     shardings, grad_accum)

    def init_state(self, params, lr: float) -> TrainState:
        return init_train_state(params, self.tx_at, lr)

    def __call__(self, state: TrainState, inputs_BxT, targets_BxT):
        return self._step(state, inputs_BxT, targets_BxT)

    def compile(self, state, inputs_BxT, targets_BxT):
        """Compiles the step for these shapes and placements (jax.ShapeDtypeStruct trees) before
        its first call, which then runs it; the compiled program's memory analysis."""
        self._step = self._step.lower(state, inputs_BxT, targets_BxT).compile()
        return self._step.memory_analysis()

    def step_records(self, state: TrainState, step: int) -> list[dict] | None:
        return None

    def log_values(self, state: TrainState, inputs_BxT, measured: dict) -> dict:
        return measured
