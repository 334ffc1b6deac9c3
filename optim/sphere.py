"""The hypersphere step of MuonH and AdamH (HyperP, docs/rules.md: HyperP).

For every matrix W (each layer of a stacked leaf its own sphere, never the whole stack), given an
incoming direction O (Muon's orthogonalized momentum, or Adam's m̂/(√v̂+ε)):
`W' = W(1 − ηλ) − η·(‖W‖_F/‖O‖_F)·O`, then the retraction `W ← W'·R/‖W'‖_F` to the radius R,
the norm W had at initialization. `direction_norm` may replace ‖O‖_F by another measure of O,
e.g. the norm O would have at full rank (`full_rank_norm`), which for a rank-limited O keeps
the step per active direction from growing as the rank fraction falls. η is a relative (angular) step, so the transform owns the
learning rate: it is the last link of its chain and emits the whole change `W_new − W`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optim.trees import MatrixAxes, axes_by_path, path_key


class SphereState(NamedTuple):
    count: jax.Array
    radius: Any  # per matrix: ‖W‖_F at init, shaped like the leaf with its fan axes kept as 1


def _fan_axes(x: jax.Array, axes: MatrixAxes) -> tuple[int, ...]:
    return tuple(a % x.ndim for a in axes.fan_in_axes + axes.fan_out_axes)


def frobenius_norms(x: jax.Array, axes: MatrixAxes) -> jax.Array:
    """‖·‖_F of every matrix in x (batch axes kept, fan axes reduced to size 1), in float32."""
    x32 = x.astype(jnp.float32)
    return jnp.sqrt(jnp.sum(x32 * x32, axis=_fan_axes(x, axes), keepdims=True))


def full_rank_norm(scale: float = 1.0):
    """A `direction_norm`: s·√min(fan_in, fan_out), the Frobenius norm of s times an orthogonal
    factor of full rank (so it equals ‖O‖_F for such an O); `scale` may be a function of
    (fan_out, fan_in), as Muon's update scales are."""
    def norm(o: jax.Array, axes: MatrixAxes) -> jax.Array:
        fan_in = math.prod(o.shape[a] for a in axes.fan_in_axes)
        fan_out = math.prod(o.shape[a] for a in axes.fan_out_axes)
        s = scale(fan_out, fan_in) if callable(scale) else scale
        return jnp.asarray(s * math.sqrt(min(fan_in, fan_out)), jnp.float32)
    return norm


def _map_matrices(fn, matrix_axes, tree, *rest):
    """fn(axes, leaf, *rest_leaves) over the leaves of `tree`, each with its MatrixAxes."""
    by_path = axes_by_path(matrix_axes)

    def one(path, x, *others):
        key = path_key(path)
        if key not in by_path:
            raise ValueError(f"sphere: parameter {'/'.join(map(str, key))} has no matrix axes; "
                             "only matrices may go on a sphere")
        return fn(by_path[key], x, *others)

    return jax.tree_util.tree_map_with_path(one, tree, *rest)


def scale_to_sphere(learning_rate: optax.ScalarOrSchedule, matrix_axes, *,
                    weight_decay: float = 0.0,
                    direction_norm: Callable[[jax.Array, MatrixAxes], jax.Array] | None = None
                    ) -> optax.GradientTransformation:
    """The relative step along the incoming direction, then the retraction to the init radius.

    `matrix_axes` is a tree (or prefix) of MatrixAxes like optim.muon's. `weight_decay` λ > 0
    shrinks W before the step; after the retraction that only rescales the step by 1/(1 − ηλ).
    `direction_norm(O, axes)`: what O is divided by (None: ‖O‖_F per matrix).
    """
    norm_of = frobenius_norms if direction_norm is None else direction_norm
    schedule = learning_rate if callable(learning_rate) else (lambda count: learning_rate)

    def init(params):
        return SphereState(count=jnp.zeros((), jnp.int32),
                           radius=_map_matrices(lambda axes, w: frobenius_norms(w, axes),
                                                 matrix_axes, params))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("scale_to_sphere needs the parameters: pass params to update()")
        eta = schedule(state.count)

        def step(axes, o, w, radius):
            w32 = w.astype(jnp.float32)
            o_norm = norm_of(o, axes)
            relative = jnp.where(o_norm > 0, frobenius_norms(w, axes) / o_norm, 0.0)
            moved = w32 * (1 - eta * weight_decay) - eta * relative * o.astype(jnp.float32)
            retracted = moved * (radius / frobenius_norms(moved, axes))
            return (retracted - w32).astype(w.dtype)

        out = _map_matrices(step, matrix_axes, updates, params, state.radius)
        return out, SphereState(count=state.count + 1, radius=state.radius)

    return optax.GradientTransformation(init, update)
