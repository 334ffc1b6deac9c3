"""Backend `pallas` of `optim.orthogonalize`: the direct Newton–Schulz map through Pallas kernels.

Matrices whose fused footprint fits on chip run in one fused kernel per stack; larger ones take
three tiled kernels per step: the symmetric Gram A = XXᵀ, the symmetric B = bA + cA², and the
epilogue aX + BX: 3m²n + m³ multiply-adds per step instead of 4m²n + 2m³ (docs/rules.md: Muon).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from optim.kernels import platforms as P
from optim.kernels import tiles as T
from optim.kernels.compat import platform
from optim.kernels.fused import fused_newton_schulz
from optim.kernels.ns_math import NORMALIZATIONS, normalized_gram, short_side_first
from optim.kernels.polynomial import apply_polynomial
from optim.kernels.symmetric import symmetric_gram

KERNELS = ("auto", "fused", "tiled")


def _padded(x: jax.Array, rows: int, cols: int) -> jax.Array:
    # zero rows and columns stay zero through every step and leave the norms unchanged
    return jnp.pad(x, ((0, 0), (0, rows - x.shape[1]), (0, cols - x.shape[2])))


def _fused_shape(m: int, n: int, facts: P.Platform) -> tuple[int, int]:
    rows, cols = P.round_up(m, facts.align), P.round_up(n, facts.align)
    if facts.power_of_two_blocks:
        rows, cols = P.next_power_of_two(rows), P.next_power_of_two(cols)
    return rows, cols


def tiled_newton_schulz(x: jax.Array, coefficients: Sequence[tuple[float, float, float]], *,
                        safety: float, eps: float, normalization: str, tile: int,
                        dtype=jnp.float32, reduce_in_grid: bool = True, target: str = "cpu",
                        interpret=None) -> jax.Array:
    """Newton–Schulz on a float32 (batch, m, n) stack, m ≤ n, both multiples of `tile`."""
    opts = {"tile": tile, "dtype": dtype, "reduce_in_grid": reduce_in_grid, "target": target,
            "interpret": interpret}
    # the reference's normalization, on the whole symmetric matrix (a valid upper storage too)
    scale, gram = normalized_gram(T.mirror_upper(symmetric_gram(x, **opts), tile),
                                   normalization, safety, eps)
    x = x * scale
    for step, (a, b, c) in enumerate(coefficients):
        if step > 0:
            gram = symmetric_gram(x, **opts)
        poly = symmetric_gram(gram, symmetric=True, alpha=b, beta=c, **opts)
        x = apply_polynomial(poly, x, a, **opts)
    return x


def pallas_newton_schulz(g: jax.Array, coefficients: Sequence[tuple[float, float, float]], *,
                         safety: float = 1.0, eps: float = 1e-7, compute_dtype=None,
                         normalization: str = "frobenius", method: str = "auto",
                         kernel: str = "auto", tile: int | None = None, target: str | None = None,
                         reduce_in_grid: bool | None = None, interpret=None) -> jax.Array:
    """The map of `orthogonalize.newton_schulz` over the last two axes of `g`, by Pallas kernels.

    kernel: `fused` (whole matrix on chip), `tiled` (symmetric tiles), or `auto` (fused when its
    footprint fits the platform's on-chip memory). target: the platform whose kernel settings
    apply (default: the running one; kernels run in the interpreter on CPU). tile and
    reduce_in_grid override the platform's tiled-kernel settings.
    """
    if method == "gram":
        raise ValueError("orthogonalize.method='gram': the pallas backend runs the direct form; "
                         "expected 'auto' or 'direct' (or backend='xla' for the Gram iteration)")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"orthogonalize.normalization={normalization!r}: expected one of "
                         f"{list(NORMALIZATIONS)}")
    if kernel not in KERNELS:
        raise ValueError(f"orthogonalize.kernel={kernel!r}: expected one of {list(KERNELS)}")
    if tile is not None and (not isinstance(tile, int) or tile < 1):
        raise ValueError(f"orthogonalize.tile={tile!r}: expected a positive integer")
    target = target or platform()
    facts = P.platform_facts(target)
    x, tall = short_side_first(g)
    lead, (m, n) = x.shape[:-2], x.shape[-2:]
    x = x.reshape((-1, m, n))
    dtype = jnp.dtype(compute_dtype or jnp.float32)
    rows, cols = _fused_shape(m, n, facts)
    if kernel == "auto":
        fits = P.fused_footprint_bytes(rows, cols, dtype.itemsize) <= facts.on_chip_bytes
        kernel = "fused" if fits else "tiled"
    common = {"safety": safety, "eps": eps, "normalization": normalization, "dtype": dtype,
                  "target": target, "interpret": interpret}
    if kernel == "fused":
        out = fused_newton_schulz(_padded(x, rows, cols), coefficients, **common)
    else:
        tile = tile or facts.tile
        rows, cols = P.round_up(m, tile), P.round_up(n, tile)
        if reduce_in_grid is None:
            reduce_in_grid = facts.reduce_in_grid
        out = tiled_newton_schulz(_padded(x, rows, cols), coefficients, tile=tile,
                                  reduce_in_grid=reduce_in_grid, **common)
    out = out[:, :m, :n].reshape((*lead, m, n))
    out = jnp.swapaxes(out, -1, -2) if tall else out
    return out.astype(g.dtype)
