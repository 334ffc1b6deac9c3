"""Byte MLP LM: predicts the next token from the last `context` tokens; for fast checks."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import ModelConfig, Runtime, compute_dtype
from models.layers import (
    LayerTransform,
    constrain,
    float32_logits,
    outlier_percent,
    rms,
    scan_layers,
)
from models.tagged import iter_params, tagged_param


class ByteMLP(nnx.Module):
    """One embedding table per context offset (summed), `depth` hidden layers, a readout.

    Position t sees tokens t-context+1..t (zero-padded at the start), so it is causal by
    construction and trains with the same next-token loop as the Transformer.
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int, runtime: Runtime, *, rngs: nnx.Rngs):
        if runtime.branch_multiplier != 1.0:
            raise ValueError(f"branch_multiplier={runtime.branch_multiplier}: expected 1.0 for "
                             "the byte MLP, which has no residual branches")
        K, D, L, V = cfg.context, cfg.width, cfg.depth, vocab_size
        self.logit_multiplier = runtime.logit_multiplier
        self.activation_sharding = runtime.activation_sharding
        self.scan_unroll, self.compute_dtype = cfg.scan_unroll, compute_dtype(cfg.compute_dtype)
        self.embed = tagged_param(rngs.params(), (K, V, D), role="input", fan_in_axes=(-2,),
                                  fan_out_axes=(-1,), logical_axes=("context", "vocab", "embed"),
                                  init_scale=cfg.embed_std)
        self.embed_bias = tagged_param(None, (D,), role="vector", fan_in_axes=(),
                                       fan_out_axes=(-1,), logical_axes=("embed",), init="zero")
        self.layers = nnx.Dict(
            w=tagged_param(rngs.params(), (L, D, D), role="hidden", fan_in_axes=(-2,),
                           fan_out_axes=(-1,), logical_axes=("layers", "embed", "mlp")),
            b=tagged_param(None, (L, D), role="vector", fan_in_axes=(), fan_out_axes=(-1,),
                           logical_axes=("layers", "mlp"), init="zero"),
        )
        self.readout = tagged_param(rngs.params(), (D, V), role="output", fan_in_axes=(-2,),
                                    fan_out_axes=(-1,), logical_axes=("embed", "vocab"),
                                    init=cfg.readout_init)

    def forward(self, tokens_BxT: jax.Array, layer_transform: LayerTransform | None = None):
        dtype = self.compute_dtype
        embed_KxVxD = self.embed[...].astype(dtype)
        K = embed_KxVxD.shape[0]
        padded_BxT = jnp.pad(tokens_BxT, ((0, 0), (K - 1, 0)))
        T = tokens_BxT.shape[1]
        h_BxTxD = sum(jnp.take(embed_KxVxD[k], padded_BxT[:, K - 1 - k:K - 1 - k + T], axis=0)
                      for k in range(K))
        h_BxTxD = constrain(jax.nn.gelu(h_BxTxD + self.embed_bias[...].astype(dtype)),
                            self.activation_sharding)
        embed_rms = rms(h_BxTxD)

        def layer(h, p):
            h = constrain(jax.nn.gelu(h @ p["w"].astype(dtype) + p["b"].astype(dtype)),
                          self.activation_sharding)
            return h, {"block_out": rms(h), "outliers": outlier_percent(h)}

        stacked = {name: param[...] for name, param in self.layers.items()}
        h_BxTxD, layer_stats = scan_layers(layer, h_BxTxD, stacked, layer_transform,
                                           self.scan_unroll)
        logits_BxTxV = float32_logits(h_BxTxD, self.readout[...]) * self.logit_multiplier
        return logits_BxTxV, {"embed_out": embed_rms, **layer_stats, "logits": rms(logits_BxTxV)}

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (Kaplan et al.): 6 per parameter but the embedding tables'
        (lookups); no attention, so no term in seq_len."""
        embed = math.prod(self.embed.shape)
        return 6.0 * (sum(math.prod(p.shape) for _, p in iter_params(self)) - embed)

    def __call__(self, tokens_BxT, layer_transform: LayerTransform | None = None):
        return self.forward(tokens_BxT, layer_transform)[0]
