"""Scaling metadata inferred for any Flax NNX model, from a base and a delta copy of it.

As in the `mup` library's `set_base_shapes`: an axis is *infinite* when its size differs between
the base and the delta model (both built at widths the user picks), finite otherwise. A weight's
role follows from which of its fan axes are infinite (LAYERS says where a known layer's fan-in
and fan-out lie, a convolution's receptive field counted in its fan-in):

    fan-in  fan-out   role
    finite  infinite  input   (an embedding, a first layer on data)
    inf.    infinite  hidden
    inf.    finite    output  (the readout)
    finite  finite    an error: nothing grows, no rule applies

Biases and norm scales are vectors, their infinite axes the fan-out. Axes in front of a layer's
own are stacked-layer axes (nnx.vmap / nnx.scan). Metadata given explicitly (tagged_param, or
models.tagged.annotate on any Param) always wins; a parameter that neither a layer type nor its
metadata explains is an error naming its path and shape and how to annotate it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

from flax import nnx

from models.tagged import LAYER_AXIS, ROLES, UNIT_DRAW, ParamSpec, iter_params, tagged_spec

ANNOTATE_HINT = ("annotate it: models.tagged.annotate(nnx.Param(...), role=..., fan_in_axes=..., "
                 "fan_out_axes=...)")
FINITE_AXIS = "finite"  # the logical axis of a dimension that does not grow (kept whole)


class InferenceError(ValueError):
    """A parameter whose scaling cannot be inferred; the message says how to annotate it."""


@dataclasses.dataclass(frozen=True)
class Weight:
    """A layer's matrix-like parameter: its fan axes from the layer, `dense`: its inputs are
    features (init std 1/√fan_in), not one-hot rows of a table (an embedding: std 1)."""

    fan_in: Callable[[nnx.Module], tuple[int, ...]]
    fan_out: Callable[[nnx.Module], tuple[int, ...]]
    dense: bool = True


@dataclasses.dataclass(frozen=True)
class Vector:
    """A layer's bias or scale, initialized to `init` ("zero" or "one")."""

    init: str


LAST_IN, LAST_OUT = (lambda m: (-2,)), (lambda m: (-1,))


def _conv_fan_in(module: nnx.Conv) -> tuple[int, ...]:
    """The receptive field and the input channels: kernel (*kernel_size, in, out)."""
    return tuple(range(-len(module.kernel_size) - 2, -1))


def _general_fan_in(module: nnx.LinearGeneral) -> tuple[int, ...]:
    n_in, n_out = len(module.in_features), len(module.out_features)
    return tuple(range(-n_in - n_out, -n_out))


def _general_fan_out(module: nnx.LinearGeneral) -> tuple[int, ...]:
    return tuple(range(-len(module.out_features), 0))


def _einsum_axes(module: nnx.Einsum, contracted: bool) -> tuple[int, ...]:
    """Kernel axes whose letter is summed against the input (fan-in) or kept in the output."""
    inputs, output = module.einsum_str.replace(" ", "").split("->")
    operand, kernel = inputs.split(",")
    kernel = re.sub(r"\.\.\.", "", kernel)
    n = len(kernel)
    if contracted:
        return tuple(i - n for i, c in enumerate(kernel) if c in operand and c not in output)
    return tuple(i - n for i, c in enumerate(kernel) if c in output)


# layer type -> attribute -> what it is. nnx.MultiHeadAttention is made of LinearGeneral
# projections (and LayerNorms on queries and keys), so it is covered through them.
LAYERS: dict[type, dict[str, Weight | Vector]] = {
    nnx.Linear: {"kernel": Weight(LAST_IN, LAST_OUT), "bias": Vector("zero")},
    nnx.LinearGeneral: {"kernel": Weight(_general_fan_in, _general_fan_out),
                        "bias": Vector("zero")},
    nnx.Einsum: {"kernel": Weight(lambda m: _einsum_axes(m, True),
                                  lambda m: _einsum_axes(m, False)),
                 "bias": Vector("zero")},
    nnx.Conv: {"kernel": Weight(_conv_fan_in, LAST_OUT), "bias": Vector("zero")},
    nnx.ConvTranspose: {"kernel": Weight(_conv_fan_in, LAST_OUT), "bias": Vector("zero")},
    nnx.Embed: {"embedding": Weight(LAST_IN, LAST_OUT, dense=False)},
    nnx.LayerNorm: {"scale": Vector("one"), "bias": Vector("zero")},
    nnx.RMSNorm: {"scale": Vector("one")},
    nnx.GroupNorm: {"scale": Vector("one"), "bias": Vector("zero")},
    nnx.BatchNorm: {"scale": Vector("one"), "bias": Vector("zero")},
}


def _entries(owner: Any) -> dict[str, Weight | Vector]:
    """What each parameter attribute of a known layer (or a subclass of one) is; {} else."""
    for layer, entries in LAYERS.items():
        if isinstance(owner, layer):
            return entries
    return {}


def _name(path: tuple) -> str:
    return "/".join(map(str, path))


def _normalize(axes, ndim: int) -> tuple[int, ...]:
    return tuple(sorted(a - ndim if a >= 0 else a for a in axes))


WEIGHT_ROLES = {(False, True): "input", (True, True): "hidden", (True, False): "output"}


def _weight_role(path, shape, fan_in, fan_out, infinite) -> str:
    key = (any(a in infinite for a in fan_in), any(a in infinite for a in fan_out))
    if key not in WEIGHT_ROLES:
        raise InferenceError(
            f"parameter {_name(path)} {shape}: no fan axis grows with width (fan-in axes "
            f"{fan_in}, fan-out axes {fan_out}), so no width rule applies; {ANNOTATE_HINT}, or "
            "build the base and delta models at different widths")
    stray = set(infinite) - set(fan_in) - set(fan_out)
    if stray:
        raise InferenceError(f"parameter {_name(path)} {shape}: axes {sorted(stray)} grow with "
                             f"width but are neither its fan-in {fan_in} nor fan-out {fan_out}; "
                             f"{ANNOTATE_HINT}")
    return WEIGHT_ROLES[key]


def _logical_axes(role: str, ndim: int, fan_in, fan_out, infinite, stacked: int
                  ) -> tuple[str, ...]:
    """Sharding names: the first `stacked` axes LAYER_AXIS (nnx.vmap / nnx.scan), infinite
    fan-in axes 'embed', a hidden matrix's infinite fan-out 'mlp' (so the two split over
    different mesh axes), a vector's or an input's infinite axes 'embed', other finite axes
    FINITE_AXIS (kept whole)."""
    names = []
    for a in range(-ndim, 0):
        if a < stacked - ndim:
            names.append(LAYER_AXIS)
        elif a not in infinite:
            names.append(FINITE_AXIS)
        elif a in fan_out and role == "hidden":
            names.append("mlp")
        else:
            names.append("embed")
    return tuple(names)


def _stacked(param_ndim: int, owner: Any, entry: Weight | Vector | None, fan_in, fan_out) -> int:
    """How many leading axes stack copies of a layer: those in front of a weight's fan axes;
    for a vector, as many as its layer's weight has (none when the layer has no weight)."""
    if isinstance(entry, Weight) or entry is None:
        return param_ndim + min(fan_in + fan_out, default=0) if (fan_in or fan_out) else 0
    for attribute, other in _entries(owner).items():
        if isinstance(other, Weight) and hasattr(owner, attribute):
            weight = getattr(owner, attribute)
            axes = other.fan_in(owner) + other.fan_out(owner)
            return len(weight.shape) + min(axes)
    return 0


def _spec(path, param, entry, owner, infinite, meta) -> ParamSpec:
    shape, ndim = tuple(param.shape), len(param.shape)
    role, init = meta.get("role"), meta.get("init")
    init_scale = float(meta.get("init_scale", 1.0))
    fan_in = meta.get("fan_in_axes")
    fan_out = meta.get("fan_out_axes")
    if role is not None and role not in ROLES:
        raise InferenceError(f"parameter {_name(path)}: role={role!r}: expected one of {ROLES}")
    if isinstance(entry, Weight) and role != "vector":
        fan_in = entry.fan_in(owner) if fan_in is None else fan_in
        fan_out = entry.fan_out(owner) if fan_out is None else fan_out
        init = init or "normal"
    elif (isinstance(entry, Vector) or role == "vector" or fan_in == ()
          or (role is None and ndim == 1 and "init" in meta)):
        # no fan-in axes: a vector (an input matrix has rows, finite as they are)
        fan_in = ()
        fan_out = (tuple(a for a in range(-ndim, 0) if a in infinite) if fan_out is None
                   else fan_out)
        role, init = "vector", init or (entry.init if isinstance(entry, Vector) else None)
        if init is None:
            raise InferenceError(f"parameter {_name(path)} {shape}: a vector whose init is not "
                                 "known; annotate it: models.tagged.annotate(nnx.Param(...), "
                                 "role='vector', init='zero' or 'one' or 'normal')")
    elif role == "input" and fan_out is None:
        fan_out = tuple(a for a in range(-ndim, 0) if a in infinite)
        fan_in, init = fan_in or (), init or "normal"
    elif fan_in is None or fan_out is None:
        raise InferenceError(f"parameter {_name(path)} {shape}: not a parameter of a known layer "
                             f"({', '.join(t.__name__ for t in LAYERS)}); {ANNOTATE_HINT}")
    fan_in, fan_out = _normalize(fan_in, ndim), _normalize(fan_out, ndim)
    inferred_role = (_weight_role(path, shape, fan_in, fan_out, infinite)
                     if role != "vector" else "vector")
    role = role or inferred_role
    if isinstance(entry, Weight) and entry.dense and role == "input" and "init_scale" not in meta:
        init_scale = math.prod(shape[a] for a in fan_in) ** -0.5  # features: fan-in init
    stacked = _stacked(ndim, owner, entry, fan_in, fan_out)
    logical = tuple(meta.get("logical_axes")
                    or _logical_axes(role, ndim, fan_in, fan_out, infinite, stacked))
    return ParamSpec(path=path, shape=shape, role=role, fan_in_axes=fan_in, fan_out_axes=fan_out,
                     logical_axes=logical, residual=bool(meta.get("residual", False)),
                     init=init or "normal", init_scale=init_scale, redraw=True)


def _is_tagged(meta: dict) -> bool:
    """Made by tagged_param: complete metadata, and a unit draw the parametrization rescales
    (an annotated Param holds its layer's own draw, so it is drawn afresh)."""
    return bool(meta.get(UNIT_DRAW))


def infer_specs(model: nnx.Module, base: nnx.Module, delta: nnx.Module
                ) -> dict[tuple, ParamSpec]:
    """Every parameter's spec: tagged ones as tagged, the rest inferred from the axes that
    differ between `base` and `delta` (the model itself may be any of the three, or a fourth
    width). All three may be abstract (nnx.eval_shape)."""
    base_shapes = {path: tuple(p.shape) for path, p in iter_params(base)}
    delta_shapes = {path: tuple(p.shape) for path, p in iter_params(delta)}
    params = dict(iter_params(model))
    if not (set(params) == set(base_shapes) == set(delta_shapes)):
        odd = sorted(map(_name, set(params) ^ set(base_shapes) | set(params) ^ set(delta_shapes)))
        raise InferenceError(f"the base, delta and target models have different parameters "
                             f"({odd[:3]}): build them with the same function at other widths")
    modules = {tuple(path): node for path, node in nnx.iter_graph(model)}
    specs = {}
    for path, param in params.items():
        if _is_tagged(param.get_metadata()):
            specs[path] = tagged_spec(path, param)
            continue
        b, d = base_shapes[path], delta_shapes[path]
        if len(b) != len(d) or len(b) != len(param.shape):
            raise InferenceError(f"parameter {_name(path)}: {len(b)} axes at the base width, "
                                 f"{len(d)} at the delta: a width must only change sizes")
        infinite = tuple(a - len(b) for a in range(len(b)) if b[a] != d[a])
        owner = modules[path[:-1]]
        specs[path] = _spec(path, param, _entries(owner).get(path[-1]), owner, infinite,
                            param.get_metadata())
    return specs


def is_fully_tagged(model: nnx.Module) -> bool:
    """Whether every parameter carries complete scaling metadata (no inference needed)."""
    return all(_is_tagged(p.get_metadata()) for _, p in iter_params(model))
