"""Pure functions shared by the models: normalization, rotary embeddings, attention, scanning."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

# (layer_params, layer_index) -> layer_params; how MeZO perturbs weights lazily, layer by layer.
LayerTransform = Callable[[dict, jax.Array], dict]


def rms_norm(x_BxTxD: jax.Array, gain_D: jax.Array, eps: float = 1e-6) -> jax.Array:
    ms_BxTx1 = jnp.mean(jnp.square(x_BxTxD), axis=-1, keepdims=True)
    return x_BxTxD * jax.lax.rsqrt(ms_BxTx1 + eps) * gain_D


def rms(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32))))


def rope(x_BxTxNxH: jax.Array, base: float) -> jax.Array:
    """Rotary position embedding over the head dim (rotate-half convention)."""
    T, H = x_BxTxNxH.shape[1], x_BxTxNxH.shape[-1]
    inv_freq_F = base ** (-jnp.arange(0, H, 2, dtype=jnp.float32) / H)
    angle_TxF = jnp.arange(T, dtype=jnp.float32)[:, None] * inv_freq_F[None, :]
    cos_1xTx1xF = jnp.cos(angle_TxF)[None, :, None, :]
    sin_1xTx1xF = jnp.sin(angle_TxF)[None, :, None, :]
    x1, x2 = jnp.split(x_BxTxNxH, 2, axis=-1)
    return jnp.concatenate([x1 * cos_1xTx1xF - x2 * sin_1xTx1xF,
                            x2 * cos_1xTx1xF + x1 * sin_1xTx1xF], axis=-1)


def causal_attention(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, scale: float) -> jax.Array:
    return jax.nn.dot_product_attention(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, scale=scale,
                                        is_causal=True)


def scan_layers(body: Callable, x, stacked_params: dict,
                layer_transform: LayerTransform | None = None):
    """Applies `body(x, layer_params) -> (x, stats)` over the leading layer axis with a scan."""
    depth = jax.tree.leaves(stacked_params)[0].shape[0]

    def step(carry, inputs):
        layer_params, index = inputs
        if layer_transform is not None:
            layer_params = layer_transform(layer_params, index)
        return body(carry, layer_params)

    return jax.lax.scan(step, x, (stacked_params, jnp.arange(depth)))
