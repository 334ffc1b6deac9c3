"""Muon and AuON as optax transformations for hidden matrices (docs/rules.md: Muon).

`scale_by_muon` keeps the momentum, turns it into a direction (Newton–Schulz orthogonalization,
or AuON's linear-time normalization) and multiplies each matrix by its update-scale convention.
All matrices of one shape (every layer of a stacked leaf, and every leaf of that shape) go
through one batched orthogonalization call. Learning rate and weight decay are chained after it.
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optim.orthogonalize import orthogonalize
from optim.stack import StackSharding
from optim.trees import MatrixAxes, axes_by_path, path_key

UpdateScale = Literal["keller", "spectral", "moonlight"]  # optim.update_scale
# s(fan_out, fan_in): the factor on an orthogonal direction (A = fan_out, B = fan_in).
UPDATE_SCALES: dict[UpdateScale, Any] = {
    "keller": lambda a, b: math.sqrt(max(1.0, a / b)),  # RMS 1/√B
    "spectral": lambda a, b: math.sqrt(a / b),  # spectral norm √(A/B), the μP condition
    "moonlight": lambda a, b: 0.2 * math.sqrt(max(a, b)),  # RMS ≈ 0.2, like AdamW
}
DIRECTIONS = ("newton_schulz", "auon", "auon_hybrid")


class MuonState(NamedTuple):
    count: jax.Array
    mu: Any


def _as_matrices(x: jax.Array, axes: MatrixAxes):
    """x -> (batch, short, long) and the inverse; the short side first, as NS iterates on it."""
    fan_in = tuple(a % x.ndim for a in axes.fan_in_axes)
    fan_out = tuple(a % x.ndim for a in axes.fan_out_axes)
    batch = tuple(a for a in range(x.ndim) if a not in fan_in + fan_out)
    order = batch + fan_in + fan_out
    dims_in = math.prod(x.shape[a] for a in fan_in)
    dims_out = math.prod(x.shape[a] for a in fan_out)
    moved_shape = tuple(x.shape[a] for a in order)
    tall = dims_in > dims_out
    m = jnp.transpose(x, order).reshape(-1, dims_in, dims_out)
    m = jnp.swapaxes(m, -1, -2) if tall else m

    def restore(o):
        o = jnp.swapaxes(o, -1, -2) if tall else o
        return jnp.transpose(o.reshape(moved_shape), [order.index(a) for a in range(x.ndim)])

    return m, restore, (dims_in, dims_out)


def auon_direction(x_BxMxN: jax.Array, *, hybrid: bool = False, eps: float = 1e-7,
                   backend: str = "auto") -> jax.Array:
    """AuON: X = G/‖G‖_F, U = X / rms(cosh X), times √min(M, N) (an orthogonal factor's
    Frobenius norm) so that update scales and LRs mean what they mean for Muon. The hybrid
    applies one Jordan Newton–Schulz step to U and scales it to norm √min(M, N) exactly.

    For real layer sizes rms(cosh X) ≈ 1 + 1/(2MN): Frobenius-normalized momentum, a cheap
    baseline rather than an orthogonalizer.
    """
    x = x_BxMxN.astype(jnp.float32)
    x = x / (jnp.linalg.norm(x, axis=(-2, -1), keepdims=True) + eps)
    u = x / jnp.sqrt(jnp.mean(jnp.square(jnp.cosh(x)), axis=(-2, -1), keepdims=True))
    if hybrid:
        u = orthogonalize(u, scheme="jordan", steps=1, backend=backend)
        u = u / (jnp.linalg.norm(u, axis=(-2, -1), keepdims=True) + eps)
    return (u * math.sqrt(min(x.shape[-2:]))).astype(x_BxMxN.dtype)


def rank_fraction(o: jax.Array, axes: MatrixAxes) -> jax.Array:
    """‖O‖_F² / min(fan_in, fan_out) of every matrix in `o` (one value per batch index, e.g.
    per stacked layer): 1 for an orthogonal factor of full rank, r / min for rank r."""
    _, _, dims = _as_matrices(o, axes)
    fan = tuple(a % o.ndim for a in axes.fan_in_axes + axes.fan_out_axes)
    o32 = o.astype(jnp.float32)
    return jnp.sum(o32 * o32, axis=fan) / min(dims)


def orthogonalized(tree, matrix_axes, direction_fn) -> Any:
    """`direction_fn` (a batch of matrices -> their directions) on every matrix of `tree`, with
    no update scale: the bare orthogonal factors, for diagnostics."""
    return _directions(tree, axes_by_path(matrix_axes), direction_fn, lambda a, b: 1.0)


def _directions(tree, axes_of: dict, direction_fn, scale_fn, stack: StackSharding | None = None):
    """Applies `direction_fn` to all matrices of a shape at once, then each leaf's scale; with
    `stack`, the matrices of a shape are split over the devices whole."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    views, groups = [], {}
    for i, (path, x) in enumerate(flat):
        key = path_key(path)
        if key not in axes_of:
            raise ValueError(f"muon: parameter {'/'.join(map(str, key))} has no matrix axes; "
                             "only hidden matrices may be routed to Muon")
        m, restore, (fan_in, fan_out) = _as_matrices(x, axes_of[key])
        views.append((m, restore, scale_fn(fan_out, fan_in)))
        groups.setdefault((m.shape[1:], m.dtype), []).append(i)
    out = [None] * len(flat)
    for members in groups.values():
        stacked_SxMxN = jnp.concatenate([views[i][0] for i in members], axis=0)
        if stack is None:
            directions = direction_fn(stacked_SxMxN)
        else:  # the NS loop runs on each device's own matrices, then gathered back
            count = stacked_SxMxN.shape[0]
            directions = stack.release(direction_fn(stack.constrain(stacked_SxMxN)))[:count]
        ends = np.cumsum([views[i][0].shape[0] for i in members])[:-1]
        for i, direction in zip(members, jnp.split(directions, ends), strict=True):
            _, restore, scale = views[i]
            out[i] = restore(direction * scale)
    return jax.tree_util.tree_unflatten(treedef, out)


def scale_by_muon(matrix_axes, *, momentum: float = 0.95, nesterov: bool = True,
                  update_scale: str = "keller", direction: str = "newton_schulz",
                  ns_scheme: str = "polar_express", ns_steps: int | None = None,
                  ns_normalization: str = "schatten4", ns_method: str = "auto",
                  ns_dtype=None, ns_eps: float = 1e-7, momentum_dtype=jnp.float32,
                  bias_correction: bool = False, ns_backend: str = "auto",
                  stack: StackSharding | None = None) -> optax.GradientTransformation:
    """Momentum, then an orthogonalized direction times the update scale s of each matrix.

    `matrix_axes` is a tree like the parameters (or a prefix of the masked tree optax.partition
    passes) whose leaves are MatrixAxes. `M ← βM + (1−β)G`; Nesterov `U = (1−β)G + βM`, else
    `U = M`; with `bias_correction` each term is divided by its (1 − β^t) as in NAdam.
    `stack`: on a device mesh, orthogonalize whole matrices per device (StackSharding); None
    leaves the placement to the compiler.
    """
    if update_scale not in UPDATE_SCALES:
        raise ValueError(f"optim.update_scale={update_scale!r}: expected one of "
                         f"{sorted(UPDATE_SCALES)}")
    if direction not in DIRECTIONS:
        raise ValueError(f"muon direction={direction!r}: expected one of {list(DIRECTIONS)}")
    axes_of = axes_by_path(matrix_axes)
    scale_fn = UPDATE_SCALES[update_scale]
    if direction == "newton_schulz":
        def direction_fn(u):
            return orthogonalize(u, scheme=ns_scheme, steps=ns_steps, backend=ns_backend,
                                 compute_dtype=ns_dtype, normalization=ns_normalization,
                                 method=ns_method, eps=ns_eps)
    else:
        def direction_fn(u):
            return auon_direction(u, hybrid=direction == "auon_hybrid", eps=ns_eps,
                                  backend=ns_backend)

    def init(params):
        return MuonState(count=jnp.zeros((), jnp.int32),
                         mu=jax.tree.map(lambda p: jnp.zeros_like(p, momentum_dtype), params))

    def update(updates, state, params=None):
        del params
        count = state.count + 1
        beta = momentum
        mu = jax.tree.map(lambda m, g: beta * m.astype(jnp.float32) + (1 - beta) * g,
                          state.mu, updates)
        if bias_correction:
            t = count.astype(jnp.float32)
            mu_c, g_c = 1 - beta ** (t + 1 if nesterov else t), 1 - beta**t
        else:
            mu_c = g_c = 1.0
        if nesterov:
            u = jax.tree.map(lambda m, g: beta * m / mu_c + (1 - beta) * g / g_c, mu, updates)
        else:
            u = jax.tree.map(lambda m: m / mu_c, mu)
        out = _directions(u, axes_of, direction_fn, scale_fn, stack)
        out = jax.tree.map(lambda o, g: o.astype(g.dtype), out, updates)
        return out, MuonState(count=count,
                              mu=jax.tree.map(lambda m: m.astype(momentum_dtype), mu))

    return optax.GradientTransformation(init, update)
