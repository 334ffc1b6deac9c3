"""MeZO (Malladi et al., 2023): SGD from two forward passes, with probes that are never stored.

Per step a key from (seed, step); per probe i, leaf and layer a key folded from it, so the probe
z of one layer of a stacked leaf is the same whether it is drawn alone (inside the scan over
layers, as the layer's weights are read) or with the whole leaf. Each leaf carries a LeafProbe:

    perturb  θ_l ± ε·e_l·D_l·z_l             (e: ε scale, D: probe scale)
    update   θ_l −= η·(g·(U_l/e_l)·z_l + λ_l·θ_l),   g = (L⁺ − L⁻)/2ε   (U: update scale)

so the expected step is SGD with a per-leaf LR η·D_l·U_l whatever e_l is. Sparse MeZO perturbs
and updates only the entries with |θ| at or below a per-layer threshold fixed at init.

Everything here is model-agnostic: a model exposes its stacked leaves by name to a per-layer
transform, and the caller says which leaves are stacked (`LeafProbe.stacked`).
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from optim.trees import path_key

# a fold_in stream apart from every probe index: the keys of stochastic rounding
ROUNDING_STREAM = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class LeafProbe:
    """How one parameter leaf is probed and updated."""

    leaf_id: int  # stable across processes: path_id of the leaf's path
    stacked: bool = False  # leading axis is layers: one probe and one update per layer
    probe_scale: float = 1.0  # D
    update_scale: float = 1.0  # U
    eps_scale: float = 1.0  # e
    weight_decay: float = 0.0  # multiplier on the base λ (0 for vectors)
    sparse: bool = False  # Sparse MeZO's magnitude mask applies to this leaf


def path_id(path: Sequence[Any]) -> int:
    """A leaf's id from its path ("blocks/wq"): crc32, the same in every process."""
    return zlib.crc32("/".join(map(str, path)).encode()) & 0x7FFFFFFF


def step_key(seed: int | jax.Array, step: int | jax.Array) -> jax.Array:
    return jax.random.fold_in(jax.random.key(seed), step)


def probe_key(key: jax.Array, probe: int | jax.Array) -> jax.Array:
    return jax.random.fold_in(key, probe)


def _leaf_key(key: jax.Array, probe: LeafProbe) -> jax.Array:
    return jax.random.fold_in(key, probe.leaf_id)


def layer_noise(key: jax.Array, probe: LeafProbe, shape, layer=None) -> jax.Array:
    """z of one leaf (or of one layer of a stacked leaf), float32 unit normal."""
    leaf_key = _leaf_key(key, probe)
    if layer is not None:
        leaf_key = jax.random.fold_in(leaf_key, layer)
    return jax.random.normal(leaf_key, shape, jnp.float32)


def leaf_noise(key: jax.Array, probe: LeafProbe, shape) -> jax.Array:
    """z of a whole leaf; a stacked leaf's layers are drawn exactly as layer_noise draws them."""
    if not probe.stacked:
        return layer_noise(key, probe, shape)
    return jax.vmap(lambda layer: layer_noise(key, probe, shape[1:], layer))(
        jnp.arange(shape[0]))


# ---------------------------------------------------------------------------------- sparsity


def sparse_thresholds(params, plan, sparsity: float):
    """Per leaf (per layer when stacked): the magnitude at the (1 − sparsity) quantile, so the
    mask |θ| ≤ threshold keeps that fraction of the entries; +inf where no mask applies."""

    def one(x, probe: LeafProbe):
        if not (probe.sparse and sparsity > 0):
            return jnp.full((x.shape[0],) if probe.stacked else (), jnp.inf, jnp.float32)
        magnitude = jnp.abs(x.astype(jnp.float32))
        q = 1.0 - sparsity
        if probe.stacked:
            return jnp.quantile(magnitude.reshape(x.shape[0], -1), q, axis=1)
        return jnp.quantile(magnitude, q)

    return jax.tree.map(one, params, plan)


def _masked(z: jax.Array, x: jax.Array, probe: LeafProbe, threshold) -> jax.Array:
    if not probe.sparse:
        return z
    return jnp.where(jnp.abs(x.astype(jnp.float32)) <= threshold, z, 0.0)


# ------------------------------------------------------------------------------ perturbation


def _perturbed_slice(x, probe: LeafProbe, z, threshold, scale) -> jax.Array:
    """x + scale·e·D·z (masked), in float32: the forward casts to its compute dtype itself."""
    # e·D first, in Python: one rounding to float32 whether scale is traced (±ε) or a constant
    step = (scale * (probe.eps_scale * probe.probe_scale)) * _masked(z, x, probe, threshold)
    return x.astype(jnp.float32) + step


def perturb(params, plan, thresholds, key: jax.Array, scale, *, stacked: bool = True):
    """θ + scale·e·D·z for every leaf (eager); with stacked=False, stacked leaves are left as
    they are, for a layer transform (`perturb_layer`) to perturb as each layer is read."""

    def one(x, probe: LeafProbe, threshold):
        if probe.stacked and not stacked:
            return x
        z = leaf_noise(key, probe, x.shape)
        t = threshold.reshape((-1,) + (1,) * (x.ndim - 1)) if probe.stacked else threshold
        return _perturbed_slice(x, probe, z, t, scale)

    return jax.tree.map(one, params, plan, thresholds)


def perturb_layer(probes: Mapping[str, LeafProbe], thresholds: Mapping[str, jax.Array],
                  key: jax.Array, scale) -> Callable[[dict, jax.Array], dict]:
    """The per-layer transform `(layer_params, layer) -> layer_params` that perturbs one layer's
    slice of each stacked leaf, by the leaf's name in the model's stacked dict."""

    def transform(layer_params: dict, layer: jax.Array) -> dict:
        out = {}
        for name, x in layer_params.items():
            probe = probes[name]
            z = layer_noise(key, probe, x.shape, layer)
            out[name] = _perturbed_slice(x, probe, z, thresholds[name][layer], scale)
        return out

    return transform


# ------------------------------------------------------------------------------------ update


def stochastic_round(x32: jax.Array, dtype, key: jax.Array) -> jax.Array:
    """float32 -> bfloat16 rounded up or down with probability by distance: unbiased, so steps
    far below bf16's resolution still move the weights on average."""
    if jnp.dtype(dtype) == jnp.float32:
        return x32
    if jnp.dtype(dtype) != jnp.bfloat16:
        raise ValueError(f"param dtype {dtype}: expected float32 or bfloat16")
    bits = jax.lax.bitcast_convert_type(x32, jnp.uint32)
    noise = jax.random.bits(key, x32.shape, jnp.uint32) & jnp.uint32(0xFFFF)
    rounded = (bits + noise) & jnp.uint32(0xFFFF0000)
    out = jax.lax.bitcast_convert_type(rounded, jnp.float32)
    # inf and nan keep their bits; a value carried past the largest finite bf16 becomes inf
    return jnp.where(jnp.isfinite(x32), out, x32).astype(jnp.bfloat16)


def estimated_gradient(probe: LeafProbe, zs: list, gs) -> jax.Array:
    """mean_i g_i·(U/e)·z_i: the step direction, whose expectation is D·U·∇ (to O(ε²))."""
    return (sum(g * z for g, z in zip(gs, zs, strict=True)) / len(zs)) * (
        probe.update_scale / probe.eps_scale)


def _updated_slice(x, probe: LeafProbe, zs: list, gs, lr, weight_decay, threshold, key):
    """One leaf (or one layer of it) after the step; zs holds one probe per g."""
    x32 = x.astype(jnp.float32)
    direction = estimated_gradient(probe, zs, gs)
    if probe.weight_decay > 0:
        direction = direction + (weight_decay * probe.weight_decay) * x32
    if probe.sparse:  # masked weights are untouched, decay included
        direction = jnp.where(jnp.abs(x32) <= threshold, direction, 0.0)
    return stochastic_round(x32 - lr * direction, x.dtype, key)


def apply_update(params, plan, thresholds, key: jax.Array, gs: jax.Array, lr,
                 weight_decay: float = 0.0):
    """θ −= lr·(mean_i g_i·(U/e)·z_i + λθ), z_i regenerated from `key` (the step's key).

    A stacked leaf is updated one layer at a time in place (a loop of dynamic slices), so with a
    donated buffer the temporaries are one layer's, whatever the depth.
    """
    n_probes = gs.shape[0]
    probe_keys = [probe_key(key, i) for i in range(n_probes)]
    rounding = jax.random.fold_in(key, ROUNDING_STREAM)

    def one(x, probe: LeafProbe, threshold):
        if not probe.stacked:
            zs = [layer_noise(k, probe, x.shape) for k in probe_keys]
            return _updated_slice(x, probe, zs, gs, lr, weight_decay, threshold,
                                  _leaf_key(rounding, probe))

        def layer(index, stack):
            x_l = jax.lax.dynamic_index_in_dim(stack, index, keepdims=False)
            zs = [layer_noise(k, probe, x_l.shape, index) for k in probe_keys]
            rounding_l = jax.random.fold_in(_leaf_key(rounding, probe), index)
            new_l = _updated_slice(x_l, probe, zs, gs, lr, weight_decay, threshold[index],
                                   rounding_l)
            return jax.lax.dynamic_update_index_in_dim(stack, new_l, index, 0)

        return jax.lax.fori_loop(0, x.shape[0], layer, x)

    return jax.tree.map(one, params, plan, thresholds)


# --------------------------------------------------------------------------------- estimator


def projected_gradient(loss_plus: jax.Array, loss_minus: jax.Array, eps: float) -> jax.Array:
    return (loss_plus - loss_minus) / (2.0 * eps)


def curvature(loss_plus, loss_minus, loss_clean, eps: float) -> jax.Array:
    """(L⁺ + L⁻ − 2L⁰)/ε² = zᵀ(eDHDe)z + O(ε²): its mean over probes estimates the
    probe-weighted Hessian trace."""
    return (loss_plus + loss_minus - 2.0 * loss_clean) / (eps * eps)


def probe_losses(loss_at: Callable[[jax.Array, float], jax.Array], key: jax.Array,
                 n_probes: int, eps: float) -> tuple[jax.Array, jax.Array]:
    """(L⁺_i, L⁻_i) for probes i < n_probes, one forward at a time (a loop, not a batch, so the
    memory is one forward's, and one traced forward serves both signs and every probe: half
    the compile time); `loss_at(probe key, ±ε)` evaluates the perturbed objective."""

    def one(index):
        probe, minus = index // 2, index % 2
        return loss_at(probe_key(key, probe), jnp.where(minus == 1, -eps, eps))

    losses = jax.lax.map(one, jnp.arange(2 * n_probes)).reshape(n_probes, 2)
    return losses[:, 0], losses[:, 1]


def dense_plan(params, stacked: Callable[[tuple], bool] = lambda path: False) -> Any:
    """Isotropic probes for every leaf of a tree (ids from the tree paths), for small models
    and the optax adapter; `stacked(path)` marks leaves whose leading axis is layers."""

    def one(path, _):
        keys = path_key(path)
        return LeafProbe(path_id(keys), stacked=stacked(keys))

    return jax.tree_util.tree_map_with_path(one, params)


def plan_leaves(plan) -> list[LeafProbe]:
    return jax.tree.leaves(plan, is_leaf=lambda x: isinstance(x, LeafProbe))


def check_plan(plan) -> None:
    """Two leaves with one id would share their probes: refuse such a plan."""
    ids = [p.leaf_id for p in plan_leaves(plan)]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"probe plan: leaf ids {duplicates} are used twice; expected one id "
                         "per leaf (path_id of distinct paths)")
