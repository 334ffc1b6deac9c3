"""Where same-shape matrices are orthogonalized on a device mesh: whole matrices per device."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class StackSharding:
    """Same-shape matrices stacked, the stack split over `axes`, so that each device runs
    Newton–Schulz on whole matrices and no NS matmul is split across devices (the compiler
    moves the matrices there and back)."""

    mesh: jax.sharding.Mesh
    axes: tuple[str, ...]

    @property
    def shards(self) -> int:
        return math.prod(self.mesh.shape[a] for a in self.axes)

    def constrain(self, x_SxMxN: jax.Array) -> jax.Array:
        """x with its stack axis split over the mesh, padded with zero matrices to a multiple
        of the shard count (their directions are zero and dropped by the caller)."""
        pad = -x_SxMxN.shape[0] % self.shards
        if pad:
            x_SxMxN = jnp.concatenate(
                [x_SxMxN, jnp.zeros((pad, *x_SxMxN.shape[1:]), x_SxMxN.dtype)])
        for count in range(1, len(self.axes) + 1):  # one mesh axis at a time: each an all-to-all
            x_SxMxN = self._split_over(x_SxMxN, self.axes[:count])
        return x_SxMxN

    def release(self, x_SxMxN: jax.Array) -> jax.Array:
        """x kept split over every axis (the NS loop's output stays where it was computed),
        then unsplit one mesh axis at a time, for the compiler to take to the parameters'
        layout (over two axes at once it falls back to replicating the whole stack)."""
        for count in range(len(self.axes), 0, -1):
            x_SxMxN = self._split_over(x_SxMxN, self.axes[:count])
        return x_SxMxN

    def _split_over(self, x_SxMxN: jax.Array, axes: tuple[str, ...]) -> jax.Array:
        spec = jax.sharding.PartitionSpec(axes, None, None)
        return jax.lax.with_sharding_constraint(
            x_SxMxN, jax.sharding.NamedSharding(self.mesh, spec))
