"""The top singular value of every matrix, by warm-started power iteration: a diagnostic cheap
enough to log during training (σ_max per matrix, per layer of a stacked leaf).

Matrices are read off the parameters' fan axes (never their names or ndim): a stacked leaf
(layers, fan_in, fan_out) is one matrix per layer. Each call runs a few iterations of
v ← WᵀWv / ‖WᵀWv‖ from the previous call's v, so across training steps the estimate keeps
converging while each call stays cheap; σ = ‖Wv‖ never exceeds the true σ_max.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from models.tagged import ParamSpec, leaf_at
from scaling.steps.state import over_runs

ITERATIONS = 8  # per call; the warm start carries the convergence across calls


def as_matrices(x: jax.Array, spec: ParamSpec) -> jax.Array:
    """x as a batch of (fan_in, fan_out) matrices, every other axis flattened into the batch."""
    fan_in = tuple(a % x.ndim for a in spec.fan_in_axes)
    fan_out = tuple(a % x.ndim for a in spec.fan_out_axes)
    batch = tuple(a for a in range(x.ndim) if a not in fan_in + fan_out)
    dims_in = math.prod(x.shape[a] for a in fan_in)
    dims_out = math.prod(x.shape[a] for a in fan_out)
    return jnp.transpose(x, batch + fan_in + fan_out).reshape(-1, dims_in, dims_out)


def power_iteration(w_BxIxO: jax.Array, v_BxO: jax.Array,
                    iterations: int = ITERATIONS) -> tuple[jax.Array, jax.Array]:
    """(σ_max estimate per matrix, the new right singular vector estimate), in float32."""
    w_BxIxO = w_BxIxO.astype(jnp.float32)

    def normalized(v_BxO):
        return v_BxO / jnp.maximum(jnp.linalg.norm(v_BxO, axis=-1, keepdims=True), 1e-30)

    def step(_, v_BxO):
        u_BxI = jnp.einsum("bio,bo->bi", w_BxIxO, v_BxO)
        return normalized(jnp.einsum("bio,bi->bo", w_BxIxO, u_BxI))

    v_BxO = jax.lax.fori_loop(0, iterations, step, normalized(v_BxO.astype(jnp.float32)))
    sigma_B = jnp.linalg.norm(jnp.einsum("bio,bo->bi", w_BxIxO, v_BxO), axis=-1)
    return sigma_B, v_BxO


def matrix_paths(specs: dict[tuple, ParamSpec]) -> list[tuple]:
    """Parameters with both a fan-in and a fan-out: the matrices (not the norm gains)."""
    return [path for path, spec in specs.items() if spec.fan_in_axes and spec.fan_out_axes]


def init_vectors(params, specs: dict[tuple, ParamSpec], seed: int = 0) -> dict[tuple, jax.Array]:
    """A start vector per matrix (path -> (batch, fan_out)), random so it is never orthogonal to
    the top singular vector."""
    vectors = {}
    for i, path in enumerate(matrix_paths(specs)):
        b, _, o = as_matrices(leaf_at(params, path), specs[path]).shape
        vectors[path] = jax.random.normal(jax.random.fold_in(jax.random.key(seed), i), (b, o))
    return vectors


def top_singular_values(params, specs: dict[tuple, ParamSpec], vectors: dict[tuple, jax.Array],
                        iterations: int = ITERATIONS):
    """(path -> σ_max per matrix (batch,), path -> the vectors to start the next call from)."""
    sigmas, new_vectors = {}, {}
    for path, v_BxO in vectors.items():
        w_BxIxO = as_matrices(leaf_at(params, path), specs[path])
        sigmas[path], new_vectors[path] = power_iteration(w_BxIxO, v_BxO, iterations)
    return sigmas, new_vectors


def sigma_names(path: tuple, spec: ParamSpec) -> list[str]:
    """'<path>' for one matrix; '<path>/<i>' for each matrix of a leaf with other axes (the
    layers of a stacked leaf)."""
    name = "/".join(map(str, path))
    fan_axes = {a % len(spec.shape) for a in spec.fan_in_axes + spec.fan_out_axes}
    batch = [n for a, n in enumerate(spec.shape) if a not in fan_axes]
    if not batch:
        return [name]
    return [f"{name}/{i}" for i in range(math.prod(batch))]


class SpectralLog:
    """σ_max of every matrix of runs stacked on a leading axis (LRs trained together; one run
    is a stack of one), each call warm-started from the previous call's vectors. The first
    call runs START_CALLS calls' worth of iterations, since its vectors are random.
    """

    START_CALLS = 4

    def __init__(self, params, specs: dict[tuple, ParamSpec], runs: int, seed: int = 0):
        self.specs, self.runs = specs, runs
        vectors = init_vectors(jax.tree.map(lambda x: x[0], params), specs, seed)
        self.vectors, self.calls = jax.tree.map(lambda v: jnp.stack([v] * runs), vectors), 0
        self._call = jax.jit(over_runs(lambda p, v: top_singular_values(p, specs, v), runs,
                                       (0, 0)))

    def __call__(self, params) -> list[dict[str, float]]:
        """Per run: matrix name (sigma_names) -> σ_max estimate."""
        for _ in range(1 if self.calls else self.START_CALLS):
            sigmas, self.vectors = self._call(params, self.vectors)
        self.calls += 1
        sigmas = jax.device_get(sigmas)
        out = []
        for run in range(self.runs):
            named = {}
            for path, sigma in sigmas.items():
                named.update(zip(sigma_names(path, self.specs[path]), map(float, sigma[run]),
                                 strict=True))
            out.append(named)
        return out
