"""The Newton–Schulz arithmetic that the jnp path (optim.orthogonalize) and the Pallas kernels
share: orientation, operand precision and the normalization read off the first Gram matrix."""

from __future__ import annotations

from typing import Literal, get_args

import jax
import jax.numpy as jnp

NSNormalization = Literal["frobenius", "schatten4"]  # optim.ns_normalization
NORMALIZATIONS = get_args(NSNormalization)


def short_side_first(g: jax.Array) -> tuple[jax.Array, bool]:
    if g.ndim < 2:
        raise ValueError(f"orthogonalize: expected a matrix or a stack of them, got {g.shape}")
    tall = g.shape[-2] > g.shape[-1]
    x = jnp.swapaxes(g, -1, -2) if tall else g  # iterate on the short side: XXᵀ is m × m
    return x.astype(jnp.float32), tall


def matmul_in(operand_dtype):
    def matmul(p, q):
        return jnp.matmul(p.astype(operand_dtype), q.astype(operand_dtype),
                          preferred_element_type=jnp.float32)
    return matmul


def normalized_gram(gram, normalization: str, safety: float, eps: float):
    """The scale 1/ν with ν ≥ ‖X‖₂, and the Gram matrix of X/ν, from XXᵀ of the raw X.

    Frobenius: ν² = tr(XXᵀ). Schatten-4: ν⁴ = ‖XXᵀ‖_F², a tighter bound (for r equal singular
    values it is r^(1/4)·σ against r^(1/2)·σ), so fewer steps reach the same band.
    """
    if normalization == "frobenius":
        nu = jnp.sqrt(jnp.trace(gram, axis1=-2, axis2=-1))[..., None, None]
    elif normalization == "schatten4":
        nu = jnp.sqrt(jnp.linalg.norm(gram, axis=(-2, -1), keepdims=True))
    else:
        raise ValueError(f"orthogonalize.normalization={normalization!r}: expected one of "
                         f"{list(NORMALIZATIONS)}")
    scale = 1.0 / (nu * safety + eps)
    return scale, gram * scale**2
