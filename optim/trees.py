"""Parameter-tree helpers every optimizer shares: paths as plain keys, and per-matrix fan axes."""

from __future__ import annotations

import dataclasses

import jax


@dataclasses.dataclass(frozen=True)
class MatrixAxes:
    """Which axes of a parameter are its fan-in and fan-out; every other axis is a batch."""

    fan_in_axes: tuple[int, ...]
    fan_out_axes: tuple[int, ...]


def path_key(path) -> tuple:
    """A tree path (jax's key entries) as a tuple of plain dict keys, names and indices."""
    return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)


def axes_by_path(matrix_axes) -> dict[tuple, MatrixAxes]:
    """The MatrixAxes leaves of a tree (or a prefix of one), by their path_key."""
    flat, _ = jax.tree_util.tree_flatten_with_path(
        matrix_axes, is_leaf=lambda x: isinstance(x, MatrixAxes))
    return {path_key(path): axes for path, axes in flat if isinstance(axes, MatrixAxes)}
