"""Parameters that carry their scaling metadata (role, fan axes, residual flag, logical axes)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any, Literal, get_args

import jax
import jax.numpy as jnp
from flax import nnx

Role = Literal["input", "hidden", "output", "vector"]
Init = Literal["normal", "zero", "one"]  # a unit normal (scaled by the parametrization), 0 or 1
ROLES, INITS = get_args(Role), get_args(Init)
LAYER_AXIS = "layers"  # the logical axis of a stacked leaf: the models scan over it
UNIT_DRAW = "unit_draw"  # tagged_param's mark: a unit draw that the parametrization rescales


def tagged_param(
    key: jax.Array | None,
    shape: tuple[int, ...],
    *,
    role: Role,
    fan_in_axes: tuple[int, ...],
    fan_out_axes: tuple[int, ...],
    logical_axes: tuple[str, ...],
    residual: bool = False,
    init: Init = "normal",
    init_scale: float = 1.0,
) -> nnx.Param:
    """A Param drawn unscaled (unit normal, zero or one); the parametrization sets its std.

    Fan axes are negative so that a leading stacked-layer axis never shifts them.
    """
    assert role in ROLES and init in INITS, (role, init)
    assert all(a < 0 for a in fan_in_axes + fan_out_axes), "fan axes must be negative"
    assert len(logical_axes) == len(shape), (logical_axes, shape)
    if init == "normal":
        value = jax.random.normal(key, shape, jnp.float32)
    elif init == "zero":
        value = jnp.zeros(shape, jnp.float32)
    else:
        value = jnp.ones(shape, jnp.float32)
    return nnx.Param(
        value, role=role, fan_in_axes=fan_in_axes, fan_out_axes=fan_out_axes,
        logical_axes=logical_axes, residual=residual, init=init, init_scale=init_scale,
        **{UNIT_DRAW: True})


# What a parameter's metadata may say about its scaling; tagged_param sets all of it, `annotate`
# any part (scaling.inference infers the rest from shapes and layer types)
SCALING_METADATA = ("role", "fan_in_axes", "fan_out_axes", "logical_axes", "residual", "init",
                    "init_scale")


def annotate(param: nnx.Param, **metadata) -> nnx.Param:
    """Sets scaling metadata (SCALING_METADATA) on any Param, e.g. a ViT's position embedding
    `annotate(nnx.Param(x), role="input")`: what is given always wins over inference."""
    unknown = sorted(set(metadata) - set(SCALING_METADATA))
    if unknown:
        raise ValueError(f"annotate: unknown scaling metadata {unknown}: expected some of "
                         f"{list(SCALING_METADATA)}")
    if metadata.get("role", ROLES[0]) not in ROLES:
        raise ValueError(f"annotate: role={metadata['role']!r}: expected one of {list(ROLES)}")
    if metadata.get("init", INITS[0]) not in INITS:
        raise ValueError(f"annotate: init={metadata['init']!r}: expected one of {list(INITS)}")
    for key in ("fan_in_axes", "fan_out_axes"):
        if key in metadata:
            axes = metadata[key] = tuple(metadata[key])
            if not all(isinstance(a, int) and a < 0 for a in axes):
                raise ValueError(f"annotate: {key}={axes}: expected negative axes (counted "
                                 "from the end, so a stacked layer axis never shifts them)")
    param.set_metadata(**metadata)
    return param


def mark_residual(module: nnx.Module) -> nnx.Module:
    """Marks every parameter of `module` as inside a residual block (whose branch output the
    model multiplies by a models.multipliers.BranchMultiplier): depth rules scale them."""
    for _, param in iter_params(module):
        param.set_metadata(residual=True)
    return module


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """Shape and scaling metadata of one parameter, read off a (possibly abstract) model."""

    path: tuple[Any, ...]
    shape: tuple[int, ...]
    role: Role
    fan_in_axes: tuple[int, ...]
    fan_out_axes: tuple[int, ...]
    logical_axes: tuple[str, ...]
    residual: bool
    init: Init
    init_scale: float
    # drawn afresh by the parametrization (an inferred parameter: its value is the layer's own
    # init), not a unit draw to rescale (tagged_param's)
    redraw: bool = False

    @property
    def fan_in(self) -> int:
        return _prod(self.shape, self.fan_in_axes)

    @property
    def fan_out(self) -> int:
        return _prod(self.shape, self.fan_out_axes)


def _prod(shape: tuple[int, ...], axes: tuple[int, ...]) -> int:
    out = 1
    for a in axes:
        out *= shape[a]
    return out


def iter_params(model: nnx.Module) -> Iterator[tuple[tuple[Any, ...], nnx.Param]]:
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Param):
            yield tuple(path), node


def param_specs(model: nnx.Module) -> dict[tuple[Any, ...], ParamSpec]:
    """Every Param's spec by path; a Param without a role is a bug in the model."""
    return {path: tagged_spec(path, p) for path, p in iter_params(model)}


def tagged_spec(path: tuple[Any, ...], param: nnx.Param) -> ParamSpec:
    """The spec tagged_param's metadata gives; an error naming what is missing."""
    meta = param.get_metadata()
    missing = [k for k in ("role", "fan_in_axes", "fan_out_axes", "logical_axes") if k not in meta]
    if missing:
        raise ValueError(f"parameter {'/'.join(map(str, path))} lacks scaling metadata {missing}")
    return ParamSpec(
        path=path, shape=tuple(param.shape), role=meta["role"],
        fan_in_axes=tuple(meta["fan_in_axes"]), fan_out_axes=tuple(meta["fan_out_axes"]),
        logical_axes=tuple(meta["logical_axes"]), residual=bool(meta.get("residual", False)),
        init=meta.get("init", "normal"), init_scale=float(meta.get("init_scale", 1.0)))


def tree_from_paths(values: dict[tuple[Any, ...], Any]) -> dict:
    """Nested dict with the structure of `nnx.state(model).to_pure_dict()`."""
    tree: dict = {}
    for path, value in values.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def leaf_at(tree: dict, path: tuple[Any, ...]) -> Any:
    """The value at `path` in a nested dict like tree_from_paths builds (its inverse)."""
    for key in path:
        tree = tree[key]
    return tree


def label_tree(model: nnx.Module) -> dict:
    """The role of every parameter, as a tree matching the parameter tree (for optax.partition)."""
    return tree_from_paths({path: spec.role for path, spec in param_specs(model).items()})
