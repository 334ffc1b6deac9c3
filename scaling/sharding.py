"""Sharded training with JAX's SPMD partitioner: a device mesh from config, every parameter
placed by its logical axes (models/tagged.py) through the config's rules, the batch split over
the data and fsdp axes. The compiler inserts every collective; nothing here communicates.

Axis types: every mesh axis is `AxisType.Auto`. The shardings that matter are pinned (the train
state into and out of each step, the batch, Muon's stacked matrices) and the compiler
propagates them through the model. `Explicit` axes would make every operation of the models
resolve its output sharding while tracing, which models written for one device do not do.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from models.tagged import ParamSpec
from optim.stack import StackSharding
from optim.trees import path_key
from scaling.config import MESH_AXES, ConfigError, MeshConfig, ShardingRules

BATCH_AXES = ("data", "fsdp")  # both split the batch; fsdp also splits the parameters


def mesh_shape(cfg: MeshConfig, device_count: int) -> dict[str, int]:
    """The size of every mesh axis, -1 resolved, checked against the device count."""
    sizes = {axis: getattr(cfg, axis) for axis in MESH_AXES}
    fixed = math.prod(size for size in sizes.values() if size != -1)
    for axis, size in sizes.items():
        if size == -1:
            if device_count % fixed:
                raise ConfigError(f"mesh.{axis}", -1, f"the {device_count} devices to divide "
                                  f"by the other axes' {fixed} devices")
            sizes[axis] = device_count // fixed
    if math.prod(sizes.values()) != device_count:
        raise ConfigError("mesh", sizes, f"axis sizes whose product is the {device_count} "
                          "devices (jax.device_count()), or one axis of size -1")
    return sizes


def make_mesh(cfg: MeshConfig) -> Mesh | None:
    """The mesh over every device (of every process); None when the config asks for none."""
    if all(getattr(cfg, axis) == 1 for axis in MESH_AXES):
        if jax.process_count() > 1:
            raise ConfigError("mesh", "single", f"a mesh over the {jax.device_count()} devices "
                              f"of the {jax.process_count()} processes, e.g. mesh=fsdp")
        return None
    sizes = mesh_shape(cfg, jax.device_count())
    return jax.make_mesh(tuple(sizes.values()), MESH_AXES,
                         axis_types=(AxisType.Auto,) * len(MESH_AXES))


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where every array of a run lives on the mesh."""

    mesh: Mesh
    rules: ShardingRules

    def spec(self, logical_axes: tuple[str, ...], shape: tuple[int, ...]) -> PartitionSpec:
        """Each logical axis on its rule's mesh axis, unless that axis is used already by an
        earlier one, has one device, or does not divide the size: then it is kept whole."""
        used, out, rules = set(), [], dataclasses.asdict(self.rules)
        for name, size in zip(logical_axes, shape, strict=True):
            if name not in rules:
                raise ValueError(f"logical axis {name!r} has no sharding rule: expected one of "
                                 f"{list(rules)}")
            axis = rules[name]
            if axis is None or axis in used or self.mesh.shape[axis] == 1 or size % self.mesh.shape[axis]:
                out.append(None)
            else:
                out.append(axis)
                used.add(axis)
        return PartitionSpec(*out)

    def named(self, spec: PartitionSpec) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    @property
    def replicated(self) -> NamedSharding:
        return self.named(PartitionSpec())

    @property
    def batch(self) -> NamedSharding:
        """Sequences split over data and fsdp, positions whole."""
        return self.named(PartitionSpec(BATCH_AXES))

    @property
    def activations(self) -> NamedSharding:
        """The residual stream (batch × positions × width): split like the batch."""
        return self.named(PartitionSpec(BATCH_AXES, None, None))

    @property
    def batch_shards(self) -> int:
        return math.prod(self.mesh.shape[axis] for axis in BATCH_AXES)

    @property
    def stack(self) -> StackSharding:
        """Muon's stacks of same-shape matrices, split over every device."""
        return StackSharding(self.mesh, tuple(a for a in MESH_AXES if self.mesh.shape[a] > 1))

    def state(self, state: Any, specs: dict[tuple, ParamSpec]) -> Any:
        """A NamedSharding per leaf of one run's train state, or of its parameters alone (a
        tree of arrays or shapes): a leaf whose path ends with a parameter's path and has its
        rank (optimizer moments, momentum, the parameter itself) is placed like the parameter;
        every other leaf is replicated. Runs trained together: `lead`."""
        by_length = sorted(specs.items(), key=lambda item: -len(item[0]))

        def one(path, leaf):
            key, shape = path_key(path), tuple(np.shape(leaf))
            for param_path, s in by_length:
                if key[-len(param_path):] == param_path and len(shape) == len(s.shape):
                    return self.named(self.spec(s.logical_axes, shape))
            return self.replicated

        return jax.tree_util.tree_map_with_path(one, state)

    def lead(self, shardings: Any) -> Any:
        """`shardings` of one run for runs stacked on a new leading axis (kept whole)."""
        return jax.tree.map(lambda s: self.named(PartitionSpec(None, *s.spec)), shardings)

    def check_batch(self, batch_size: int, grad_accum: int = 1) -> None:
        """Each micro-batch (the whole batch without accumulation) splits evenly."""
        if (batch_size // grad_accum) % self.batch_shards:
            rows = "" if grad_accum == 1 else f" in each of train.grad_accum={grad_accum} parts"
            raise ConfigError("train.batch_size", batch_size,
                              f"a multiple of {self.batch_shards * grad_accum}: {self.batch_shards}"
                              f" rows{rows}, one block per device the batch is split over "
                              f"(mesh data × fsdp = {dict(self.mesh.shape)})")

    def describe(self, specs: dict[tuple, ParamSpec]) -> dict:
        """The mesh and every parameter's mesh axis per dimension (null: whole), for result.json."""
        return {"mesh": dict(self.mesh.shape), "processes": jax.process_count(),
                "params": {"/".join(map(str, path)): list(self.spec(s.logical_axes, s.shape))
                           for path, s in specs.items()}}


def place(tree: Any, shardings: Any) -> Any:
    """Host or single-device arrays as global arrays with `shardings` (a matching tree): every
    process holds the same values and keeps its own shards (the training batch is read per
    shard instead: scaling.training.data.global_batch)."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def one(x, sharding):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:  # global already: reshard
            return jax.device_put(x, sharding)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(one, tree, shardings)


def layout_of(cfg: MeshConfig) -> Layout | None:
    """The run's layout on the mesh `cfg` describes; None without a mesh."""
    mesh = make_mesh(cfg)
    return None if mesh is None else Layout(mesh, cfg.rules)
