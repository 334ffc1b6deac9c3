"""Tile arithmetic shared by the kernels: the upper-triangular grid and mirrored reads.

A symmetric m × m matrix is stored as its upper tiles only (tile row ≤ tile column); the tiles
below the diagonal are never written, and a reader takes tile (r, c) with r > c as the
transpose of stored tile (c, r).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def num_upper_tiles(tiles: int) -> int:
    return tiles * (tiles + 1) // 2


def upper_tile(p, tiles: int):
    """(row, col), row ≤ col, of the p-th upper tile of a tiles × tiles grid, for p in
    [0, tiles(tiles+1)/2). Tile row r (tiles − r slots) and row tiles−1−r (r + 1 slots) share one
    row of tiles + 1 slots, so the map needs only integer division: no table, no square root.
    """
    r, c = p // (tiles + 1), p % (tiles + 1)
    first = c < tiles - r
    return jnp.where(first, r, tiles - 1 - r), jnp.where(first, r + c, c - 1)


def stored(row, col):
    """Where tile (row, col) of a symmetric matrix lives in upper-tile storage."""
    return jnp.minimum(row, col), jnp.maximum(row, col)


def mirrored(tile_RxC: jax.Array, row, col) -> jax.Array:
    """Tile (row, col) from the stored tile at `stored(row, col)`."""
    return jnp.where(row > col, tile_RxC.T, tile_RxC)


def dot(p: jax.Array, q: jax.Array, dtype) -> jax.Array:
    """p @ q with operands in `dtype`, accumulated in float32."""
    return jnp.dot(p.astype(dtype), q.astype(dtype), preferred_element_type=jnp.float32)


def dot_t(p: jax.Array, q: jax.Array, dtype) -> jax.Array:
    """p @ qᵀ (no transpose materialized) with operands in `dtype`, accumulated in float32."""
    return jax.lax.dot_general(p.astype(dtype), q.astype(dtype), (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32)


def mirror_upper(upper: jax.Array, tile: int) -> jax.Array:
    """The whole symmetric matrix (XLA, outside kernels) from upper-tile storage."""
    t = jnp.arange(upper.shape[-1]) // tile
    return jnp.where(t[:, None] > t[None, :], jnp.swapaxes(upper, -1, -2), upper)
