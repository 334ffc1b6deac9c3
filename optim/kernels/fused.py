"""Fused Newton–Schulz: one program per matrix keeps X and its Gram products on chip for every
step (normalization included), so HBM sees the matrix once in and once out."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from optim.kernels import tiles as T
from optim.kernels.compat import compiler_params, interpret_mode


def _total(v_RxC: jax.Array) -> jax.Array:
    # a 1 × 1 sum: rank-0 values trip the Triton lowering under an abstract mesh (jax 0.12)
    return jnp.sum(jnp.sum(v_RxC, axis=1, keepdims=True), axis=0, keepdims=True)


def _kernel(x_ref, out_ref, *, coefficients, safety, eps, normalization, dtype):
    x = x_ref[...]
    gram = T.dot_t(x, x, dtype)
    if normalization == "frobenius":
        rows = jax.lax.broadcasted_iota(jnp.int32, gram.shape, 0)
        cols = jax.lax.broadcasted_iota(jnp.int32, gram.shape, 1)
        nu = jnp.sqrt(_total(jnp.where(rows == cols, gram, 0.0)))
    else:  # schatten4: ‖XXᵀ‖_F^½
        nu = jnp.sqrt(jnp.sqrt(_total(gram * gram)))
    scale = 1.0 / (nu * safety + eps)
    x, gram = x * scale, gram * (scale * scale)
    for step, (a, b, c) in enumerate(coefficients):
        if step > 0:
            gram = T.dot_t(x, x, dtype)
        x = a * x + T.dot(b * gram + c * T.dot_t(gram, gram, dtype), x, dtype)
    out_ref[...] = x


def fused_newton_schulz(x: jax.Array, coefficients: Sequence[tuple[float, float, float]], *,
                        safety: float, eps: float, normalization: str, dtype=jnp.float32,
                        target: str = "cpu", interpret=None) -> jax.Array:
    """Newton–Schulz on a float32 (batch, m, n) stack, m ≤ n, one grid step per matrix."""
    batch, m, n = x.shape
    steps = len(coefficients)
    flops = batch * steps * (4 * m * m * n + 2 * m**3)
    kernel = functools.partial(_kernel, coefficients=tuple(coefficients), safety=safety, eps=eps,
                               normalization=normalization, dtype=dtype)
    spec = pl.BlockSpec((None, m, n), lambda b: (b, 0, 0))
    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct(x.shape, jnp.float32), grid=(batch,),
        in_specs=[spec], out_specs=spec,
        compiler_params=compiler_params(target, ("parallel",)),
        cost_estimate=pl.CostEstimate(flops=flops, transcendentals=0,
                                      bytes_accessed=8 * batch * m * n),
        interpret=interpret_mode(target, interpret), name="fused_newton_schulz")(x)
