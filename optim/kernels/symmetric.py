"""Symmetric Gram kernel: the upper tiles of β·YYᵀ + α·Y, and nothing below the diagonal.

Y is either a dense batch × m × k stack (the Newton–Schulz A = XXᵀ) or a symmetric m × m stack
in upper-tile storage (the A² of B = bA + cA², with the bA term fused in as α·Y). Computing only
the t(t+1)/2 upper tiles halves both products: m²k and m³ multiply-adds instead of 2m²k and 2m³.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from optim.kernels import tiles as T
from optim.kernels.compat import compiler_params, interpret_mode


def _finish(acc_RxR, add_ref, out_ref, alpha: float, beta: float):
    out = beta * acc_RxR
    if add_ref is not None:
        out = out + alpha * add_ref[...]
    out_ref[...] = out


def _grid_kernel(*refs, tiles, chunks, alpha, beta, symmetric, dtype):
    """One k-chunk of one upper tile; the chunks are a sequential grid axis (TPU)."""
    rows_ref, cols_ref, *rest = refs
    add_ref, out_ref, acc_ref = rest if alpha else (None, *rest)
    i, j = T.upper_tile(pl.program_id(1), tiles)
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    rows, cols = rows_ref[...], cols_ref[...]
    if symmetric:
        rows, cols = T.mirrored(rows, i, k), T.mirrored(cols, j, k)
    acc_ref[...] += T.dot_t(rows, cols, dtype)

    @pl.when(k == chunks - 1)
    def _store():
        _finish(acc_ref[...], add_ref, out_ref, alpha, beta)


def _loop_kernel(*refs, tiles, chunks, tile, alpha, beta, symmetric, dtype):
    """One upper tile, looping over the k-chunks of full row panels (GPU: refs are pointers)."""
    rows_ref, cols_ref, *rest = refs
    add_ref, out_ref = rest if alpha else (None, *rest)
    i, j = T.upper_tile(pl.program_id(1), tiles)

    def chunk(ref, r, k):
        if not symmetric:
            return ref[:, pl.ds(pl.multiple_of(k * tile, tile), tile)]
        lo, hi = T.stored(r, k)
        block = ref[pl.ds(pl.multiple_of(lo * tile, tile), tile),
                    pl.ds(pl.multiple_of(hi * tile, tile), tile)]
        return T.mirrored(block, r, k)

    def body(k, acc_RxR):
        return acc_RxR + T.dot_t(chunk(rows_ref, i, k), chunk(cols_ref, j, k), dtype)

    acc = jax.lax.fori_loop(0, chunks, body, jnp.zeros((tile, tile), jnp.float32))
    _finish(acc, add_ref, out_ref, alpha, beta)


def symmetric_gram(y: jax.Array, *, tile: int, dtype=jnp.float32, symmetric: bool = False,
                   alpha: float = 0.0, beta: float = 1.0, reduce_in_grid: bool = True,
                   target: str = "cpu", interpret=None) -> jax.Array:
    """Upper tiles of β·YYᵀ + α·Y for a (batch, m, k) float32 stack; m and k multiples of `tile`.

    `symmetric`: Y is itself upper-tile storage of a symmetric m × m stack (then α may be used).
    The result is float32 upper-tile storage: tiles below the diagonal are left unwritten.
    """
    batch, m, k = y.shape
    if m % tile or k % tile:
        raise ValueError(f"symmetric_gram: shape {y.shape} is not a multiple of tile={tile}")
    if alpha and not symmetric:
        raise ValueError("symmetric_gram: alpha needs a symmetric (square) input")
    tiles, chunks = m // tile, k // tile
    grid_upper = T.num_upper_tiles(tiles)
    out_shape = jax.ShapeDtypeStruct((batch, m, m), jnp.float32)
    flops = 2 * batch * grid_upper * tile * tile * k
    cost = pl.CostEstimate(flops=flops, transcendentals=0,
                           bytes_accessed=4 * batch * (m * k + m * m))
    opts = {"tiles": tiles, "chunks": chunks, "alpha": alpha, "beta": beta,
            "symmetric": symmetric, "dtype": dtype}
    if reduce_in_grid:
        def chunk_at(side):  # side 0: the tile's row panel, 1: its column panel
            def index(b, p, c):
                r = T.upper_tile(p, tiles)[side]
                return (b, *T.stored(r, c)) if symmetric else (b, r, c)
            return index

        def out_at(b, p, c):
            return (b, *T.upper_tile(p, tiles))

        chunk_spec = (None, tile, tile)
        in_specs = [pl.BlockSpec(chunk_spec, chunk_at(0)), pl.BlockSpec(chunk_spec, chunk_at(1))]
        grid = (batch, grid_upper, chunks)
        kernel = functools.partial(_grid_kernel, **opts)
        scratch = [pltpu.VMEM((tile, tile), jnp.float32)]
        semantics = ("parallel", "parallel", "arbitrary")
    else:
        def out_at(b, p):
            return (b, *T.upper_tile(p, tiles))

        if symmetric:
            whole = pl.BlockSpec((None, m, m), lambda b, p: (b, 0, 0))
            in_specs = [whole, whole]
        else:
            panel = (None, tile, k)
            in_specs = [pl.BlockSpec(panel, lambda b, p: (b, T.upper_tile(p, tiles)[0], 0)),
                        pl.BlockSpec(panel, lambda b, p: (b, T.upper_tile(p, tiles)[1], 0))]
        grid = (batch, grid_upper)
        kernel = functools.partial(_loop_kernel, tile=tile, **opts)
        scratch = []
        semantics = ("parallel", "parallel")
    operands = [y, y]
    if alpha:
        in_specs.append(pl.BlockSpec((None, tile, tile), out_at))
        operands.append(y)
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=grid, in_specs=in_specs,
        out_specs=pl.BlockSpec((None, tile, tile), out_at), scratch_shapes=scratch,
        compiler_params=compiler_params(target, semantics), cost_estimate=cost,
        interpret=interpret_mode(target, interpret), name="symmetric_gram")(*operands)

