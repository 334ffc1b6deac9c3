"""The Newton–Schulz update X ← aX + BX with B read from upper-tile storage (the fused epilogue).

B = bA + cA² is symmetric, so each (row, k) tile of B comes from stored tile (min, max), mirrored
below the diagonal; the aX term is added in the same pass that writes the new X.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from optim.kernels import tiles as T
from optim.kernels.compat import compiler_params, interpret_mode


def _grid_kernel(b_ref, x_ref, xi_ref, out_ref, acc_ref, *, chunks, a, dtype):
    """One k-chunk of one (row, column) tile of the new X; chunks are a grid axis (TPU)."""
    i, k = pl.program_id(1), pl.program_id(3)

    @pl.when(k == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    acc_ref[...] += T.dot(T.mirrored(b_ref[...], i, k), x_ref[...], dtype)

    @pl.when(k == chunks - 1)
    def _store():
        out_ref[...] = a * xi_ref[...] + acc_ref[...]


def _loop_kernel(b_ref, x_ref, out_ref, *, chunks, tile, a, dtype):
    """One (row, column) tile of the new X, looping over k-chunks of a column panel (GPU)."""
    i = pl.program_id(1)

    def body(k, acc_RxN):
        lo, hi = T.stored(i, k)
        block = b_ref[pl.ds(pl.multiple_of(lo * tile, tile), tile),
                      pl.ds(pl.multiple_of(hi * tile, tile), tile)]
        x_k = x_ref[pl.ds(pl.multiple_of(k * tile, tile), tile), :]
        return acc_RxN + T.dot(T.mirrored(block, i, k), x_k, dtype)

    acc = jax.lax.fori_loop(0, chunks, body, jnp.zeros(out_ref.shape, jnp.float32))
    out_ref[...] = a * x_ref[pl.ds(pl.multiple_of(i * tile, tile), tile), :] + acc


def apply_polynomial(b_upper: jax.Array, x: jax.Array, a: float, *, tile: int,
                     dtype=jnp.float32, reduce_in_grid: bool = True, target: str = "cpu",
                     interpret=None) -> jax.Array:
    """aX + BX for float32 X (batch, m, n) and B (batch, m, m) in upper-tile storage."""
    batch, m, n = x.shape
    if m % tile or n % tile or b_upper.shape != (batch, m, m):
        raise ValueError(f"apply_polynomial: B {b_upper.shape}, X {x.shape} do not tile by "
                         f"{tile}")
    row_tiles, col_tiles = m // tile, n // tile
    out_shape = jax.ShapeDtypeStruct(x.shape, jnp.float32)
    cost = pl.CostEstimate(flops=2 * batch * m * m * n, transcendentals=0,
                           bytes_accessed=4 * batch * (m * m + 2 * m * n))
    out_spec = pl.BlockSpec((None, tile, tile), lambda b, i, j, *k: (b, i, j))
    if reduce_in_grid:
        in_specs = [
            pl.BlockSpec((None, tile, tile), lambda b, i, j, k: (b, *T.stored(i, k))),
            pl.BlockSpec((None, tile, tile), lambda b, i, j, k: (b, k, j)),
            pl.BlockSpec((None, tile, tile), lambda b, i, j, k: (b, i, j)),
        ]
        operands = (b_upper, x, x)
        grid = (batch, row_tiles, col_tiles, row_tiles)
        kernel = functools.partial(_grid_kernel, chunks=row_tiles, a=a, dtype=dtype)
        scratch = [pltpu.VMEM((tile, tile), jnp.float32)]
        semantics = ("parallel", "parallel", "parallel", "arbitrary")
    else:
        in_specs = [pl.BlockSpec((None, m, m), lambda b, i, j: (b, 0, 0)),
                    pl.BlockSpec((None, m, tile), lambda b, i, j: (b, 0, j))]
        operands = (b_upper, x)
        grid = (batch, row_tiles, col_tiles)
        kernel = functools.partial(_loop_kernel, chunks=row_tiles, tile=tile, a=a, dtype=dtype)
        scratch = []
        semantics = ("parallel", "parallel", "parallel")
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_spec,
        scratch_shapes=scratch, compiler_params=compiler_params(target, semantics),
        cost_estimate=cost, interpret=interpret_mode(target, interpret),
        name="newton_schulz_polynomial")(*operands)
