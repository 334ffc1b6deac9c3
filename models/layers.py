"""Pure functions shared by the models: normalization, rotary embeddings, attention, scanning."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

# (layer_params, layer_index) -> layer_params; how MeZO perturbs weights lazily, layer by layer.
LayerTransform = Callable[[dict, jax.Array], dict]


def constrain(x: jax.Array, sharding: jax.sharding.Sharding | None) -> jax.Array:
    """x kept where `sharding` says (a mesh's batch split), or left to the compiler (None).

    Without it, a residual stream born from an embedding table split along its width would
    follow the table, and every matmul after it would split its contraction across devices."""
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def rms_norm(x_BxTxD: jax.Array, gain_D: jax.Array, eps: float = 1e-6) -> jax.Array:
    """In float32 whatever the compute dtype (a bf16 mean of squares loses the small ones)."""
    x32_BxTxD = x_BxTxD.astype(jnp.float32)
    ms_BxTx1 = jnp.mean(jnp.square(x32_BxTxD), axis=-1, keepdims=True)
    return (x32_BxTxD * jax.lax.rsqrt(ms_BxTx1 + eps) * gain_D).astype(x_BxTxD.dtype)


def rms(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32))))


def rope(x_BxTxNxH: jax.Array, base: float) -> jax.Array:
    """Rotary position embedding over the head dim (rotate-half convention)."""
    T, H = x_BxTxNxH.shape[1], x_BxTxNxH.shape[-1]
    inv_freq_F = base ** (-jnp.arange(0, H, 2, dtype=jnp.float32) / H)
    angle_TxF = jnp.arange(T, dtype=jnp.float32)[:, None] * inv_freq_F[None, :]
    # angles in float32; the rotation itself in the activations' dtype, so bf16 stays bf16
    cos_1xTx1xF = jnp.cos(angle_TxF)[None, :, None, :].astype(x_BxTxNxH.dtype)
    sin_1xTx1xF = jnp.sin(angle_TxF)[None, :, None, :].astype(x_BxTxNxH.dtype)
    x1, x2 = jnp.split(x_BxTxNxH, 2, axis=-1)
    return jnp.concatenate([x1 * cos_1xTx1xF - x2 * sin_1xTx1xF,
                            x2 * cos_1xTx1xF + x1 * sin_1xTx1xF], axis=-1)


# 16-bit operands are what cuDNN's fused (flash) attention takes
FUSED_ATTENTION_DTYPES = (jnp.bfloat16, jnp.float16)


def fused_attention_available(dtype) -> bool:
    """Whether the platform has a fused attention kernel for operands of `dtype`: cuDNN's on
    an NVIDIA GPU, in 16 bits. Elsewhere XLA's attention, which materializes the T×T scores."""
    return jax.default_backend() == "gpu" and jnp.dtype(dtype) in FUSED_ATTENTION_DTYPES


def causal_attention(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, scale: float) -> jax.Array:
    """Causal softmax attention through jax.nn.dot_product_attention: the fused cuDNN kernel
    where the platform has one, XLA's otherwise, and XLA's when cuDNN refuses the shapes."""
    attend = functools.partial(jax.nn.dot_product_attention, q_BxTxNxH, k_BxTxNxH, v_BxTxNxH,
                               scale=scale, is_causal=True)
    if fused_attention_available(q_BxTxNxH.dtype):
        try:
            return attend(implementation="cudnn")
        except (NotImplementedError, RuntimeError, ValueError):  # raised while tracing
            pass
    return attend(implementation="xla")


def attention_log_z(q_BxTxNxH: jax.Array, k_BxTxKxH: jax.Array, scale: float) -> jax.Array:
    """log Σ_s exp(q_t·k_s·scale) over the keys s ≤ t each query sees, (B, T, N) in float32;
    with K < N key heads, each serves N/K consecutive query heads (grouped-query attention).

    Its own logits, not those of causal_attention: shared, XLA fuses the attention differently
    and the training step's floats move in their last bits.
    """
    B, T, N, H = q_BxTxNxH.shape
    K = k_BxTxKxH.shape[2]
    q_BxTxKxGxH, k_BxTxKxH = jax.lax.stop_gradient(
        (q_BxTxNxH.reshape(B, T, K, N // K, H), k_BxTxKxH))
    logits_BxTxKxGxS = jnp.einsum("btkgh,bskh->btkgs", q_BxTxKxGxH, k_BxTxKxH,
                                  preferred_element_type=jnp.float32) * scale
    causal_Tx1x1xS = jnp.tril(jnp.ones((T, T), bool))[:, None, None, :]
    log_z_BxTxKxG = jax.nn.logsumexp(jnp.where(causal_Tx1x1xS, logits_BxTxKxGxS, -jnp.inf),
                                     axis=-1)
    return log_z_BxTxKxG.reshape(B, T, N)


def outlier_percent(x_BxTxD: jax.Array, threshold: float = 5.0) -> jax.Array:
    """Percent of features further than `threshold` standard deviations (over the features)
    from their token's mean: about 6e-5 % for Gaussian features, far more with massive
    activations."""
    x_BxTxD = jax.lax.stop_gradient(x_BxTxD).astype(jnp.float32)
    mean_BxTx1 = jnp.mean(x_BxTxD, axis=-1, keepdims=True)
    std_BxTx1 = jnp.std(x_BxTxD, axis=-1, keepdims=True)
    return 100.0 * jnp.mean(jnp.abs(x_BxTxD - mean_BxTx1) > threshold * std_BxTx1)


def float32_logits(h_BxTxD: jax.Array, readout_DxV: jax.Array) -> jax.Array:
    """The readout in the activations' dtype, accumulated and returned in float32: the softmax
    and the loss are taken in float32 whatever the compute dtype."""
    return jnp.matmul(h_BxTxD, readout_DxV.astype(h_BxTxD.dtype),
                      preferred_element_type=jnp.float32)


def cast_matrices(layer_params: dict, dtype) -> dict:
    """Matrices in the compute dtype; vectors (norm gains, biases) stay float32 for the norms."""
    return {name: p.astype(dtype) if p.ndim >= 2 else p for name, p in layer_params.items()}


def scan_layers(body: Callable, x, stacked_params: dict,
                layer_transform: LayerTransform | None = None, unroll: int | bool = 1):
    """Applies `body(x, layer_params) -> (x, stats)` over the leading layer axis with a scan.

    `unroll` is jax.lax.scan's: 1 keeps one rolled loop (compile time flat in depth), k puts k
    layers in each iteration, True unrolls every layer (fastest step on CPU at small depth).
    With a `layer_transform` the loop stays rolled: unrolled, XLA computes the transformed
    weights of many layers ahead of the layers reading them, and the memory that a per-layer
    transform exists to save (MeZO's lazy probes) grows with depth (docs/performance.md).
    """
    depth = jax.tree.leaves(stacked_params)[0].shape[0]
    if layer_transform is not None:
        unroll = 1

    def step(carry, inputs):
        layer_params, index = inputs
        if layer_transform is not None:
            layer_params = layer_transform(layer_params, index)
        return body(carry, layer_params)

    return jax.lax.scan(step, x, (stacked_params, jnp.arange(depth)), unroll=unroll)
