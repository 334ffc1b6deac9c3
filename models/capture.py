"""The RMS of every module's output in one call of a model, captured with nnx.capture (as the
`mup` library hooks every module): the forward stats of a model that reports none itself."""

from __future__ import annotations

from collections.abc import Collection

import jax
import jax.numpy as jnp
from flax import nnx

from models.multipliers import ReadoutMultiplier


def _rms(outputs) -> jax.Array:
    leaves = [x for x in jax.tree.leaves(outputs) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.sqrt(jnp.mean(jnp.stack([jnp.mean(jnp.square(x.astype(jnp.float32)))
                                        for x in leaves])))


def module_outputs(model: nnx.Module, *args, skipped: Collection[tuple] = ()):
    """(output, {module name: RMS of its output}) for `model(*args)`; a module called several
    times counts every call. Names are dot-joined paths ('blocks.0.mlp'), with ':<method>' for
    methods other than __call__. Left out: the model itself (its output is returned), the
    modules `skipped` (paths) and ReadoutMultiplier helpers (the model's output, multiplied)."""
    output, captured = nnx.capture(model, nnx.Intermediate,
                                   method_outputs=nnx.Intermediate)(*args)
    skipped = set(skipped) | {tuple(path) for path, node in nnx.iter_graph(model)
                              if isinstance(node, ReadoutMultiplier)}
    stats: dict[str, jax.Array] = {}

    def walk(node: dict, path: tuple) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, (*path, key))
            elif path and path not in skipped:
                name = ".".join(map(str, path)) + ("" if key == "__call__" else f":{key}")
                stats[name] = _rms(value)

    walk(captured.to_pure_dict(), ())
    return output, stats
