"""Decoder-only Transformer LM: pre-norm RMSNorm, causal RoPE attention, stacked scanned blocks."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import ModelConfig, Runtime, compute_dtype, mlp_hidden
from models.layers import (
    LayerTransform,
    attention_log_z,
    cast_matrices,
    causal_attention,
    constrain,
    float32_logits,
    outlier_percent,
    rms,
    rms_norm,
    rope,
    scan_layers,
)
from models.tagged import iter_params, tagged_param

# attention Z from the batch's first 1/ATTENTION_Z_SHARE sequences (at least one): a mean over
# many queries still, at that share of the cost (4% of a CPU step for the whole batch)
ATTENTION_Z_SHARE = 8


class Transformer(nnx.Module):
    """Width grows the number of heads (fixed head dim) and the MLP; depth is the block count.

    Q, K and V are separate matrices so each can be treated on its own by matrix optimizers.
    Options (ModelConfig): QK-norm, a SwiGLU MLP, grouped-query attention (K and V narrower than
    Q by q_per_kv) and tied embeddings (no readout matrix: the embedding's transpose reads out).
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int, runtime: Runtime, *, rngs: nnx.Rngs):
        D, L, F, V = cfg.width, cfg.depth, mlp_hidden(cfg), vocab_size
        KV = D // cfg.q_per_kv  # key/value width: every q_per_kv query heads share one head
        self.head_dim, self.rope_base = cfg.head_dim, cfg.rope_base
        self.logit_multiplier = runtime.logit_multiplier
        self.attention_scale = runtime.attention_scale
        self.branch_multiplier = runtime.branch_multiplier
        self.activation_sharding = runtime.activation_sharding
        self.scan_unroll, self.compute_dtype = cfg.scan_unroll, compute_dtype(cfg.compute_dtype)

        def block_matrix(shape, axes):
            return tagged_param(rngs.params(), (L, *shape), role="hidden", fan_in_axes=(-2,),
                                fan_out_axes=(-1,), logical_axes=("layers", *axes), residual=True)

        def block_gain(size=D, axis="embed", fan_out_axes=(-1,)):
            return tagged_param(None, (L, size), role="vector", fan_in_axes=(),
                                fan_out_axes=fan_out_axes, logical_axes=("layers", axis),
                                residual=True, init="one")

        # tied: the one matrix is the embedding, under the input role's rules; the readout's
        # forward multiplier still scales the logits (docs/parametrizations.md: tied embeddings)
        self.embed = tagged_param(rngs.params(), (V, D), role="input", fan_in_axes=(-2,),
                                  fan_out_axes=(-1,), logical_axes=("vocab", "embed"),
                                  init_scale=cfg.embed_std)
        blocks = {
            "attn_norm": block_gain(),
            "wq": block_matrix((D, D), ("embed", "heads")),
            "wk": block_matrix((D, KV), ("embed", "heads")),
            "wv": block_matrix((D, KV), ("embed", "heads")),
            "wo": block_matrix((D, D), ("heads", "embed")),
            "mlp_norm": block_gain(),
            "w_up": block_matrix((D, F), ("embed", "mlp")),
            "w_down": block_matrix((F, D), ("mlp", "embed")),
        }
        if cfg.qk_norm:
            # over the head dim, which does not grow with width: no fan axes (a finite vector)
            blocks.update(q_norm=block_gain(cfg.head_dim, "head_dim", ()),
                          k_norm=block_gain(cfg.head_dim, "head_dim", ()))
        if cfg.mlp == "swiglu":
            blocks.update(w_gate=block_matrix((D, F), ("embed", "mlp")))
        self.blocks = nnx.Dict(**blocks)
        self.final_norm = tagged_param(None, (D,), role="vector", fan_in_axes=(),
                                       fan_out_axes=(-1,), logical_axes=("embed",), init="one")
        self.readout = None if cfg.tie_embeddings else tagged_param(
            rngs.params(), (D, V), role="output", fan_in_axes=(-2,), fan_out_axes=(-1,),
            logical_axes=("embed", "vocab"), init=cfg.readout_init)

    def _branch(self, out_BxTxD):
        # skipped at 1 so that depth rules at their base depth are μP bit for bit
        if self.branch_multiplier == 1.0:
            return out_BxTxD
        return out_BxTxD * jnp.asarray(self.branch_multiplier, out_BxTxD.dtype)

    def _attention(self, h_BxTxD, p):
        """Causal attention of one block: (output_BxTxD, log-partition sample for attn_z)."""
        B, T, D = h_BxTxD.shape
        H = self.head_dim
        q_BxTxNxH = (h_BxTxD @ p["wq"]).reshape(B, T, D // H, H)
        k_BxTxKxH = (h_BxTxD @ p["wk"]).reshape(B, T, -1, H)
        v_BxTxKxH = (h_BxTxD @ p["wv"]).reshape(B, T, -1, H)
        if "q_norm" in p:  # per head, before the rotation
            q_BxTxNxH = rms_norm(q_BxTxNxH, p["q_norm"])
            k_BxTxKxH = rms_norm(k_BxTxKxH, p["k_norm"])
        q_BxTxNxH, k_BxTxKxH = rope(q_BxTxNxH, self.rope_base), rope(k_BxTxKxH, self.rope_base)
        o_BxTxNxH = causal_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, self.attention_scale)
        n = max(1, B // ATTENTION_Z_SHARE)
        log_z = attention_log_z(q_BxTxNxH[:n], k_BxTxKxH[:n], self.attention_scale)
        return o_BxTxNxH.reshape(B, T, D) @ p["wo"], log_z

    def _mlp(self, h_BxTxD, p):
        if "w_gate" in p:  # SwiGLU
            return (jax.nn.silu(h_BxTxD @ p["w_gate"]) * (h_BxTxD @ p["w_up"])) @ p["w_down"]
        return jax.nn.gelu(h_BxTxD @ p["w_up"]) @ p["w_down"]

    def _block(self, x_BxTxD, p):
        p = cast_matrices(p, self.compute_dtype)  # after any layer transform, which sees float32
        attn_out_BxTxD, log_z_nxTxN = self._attention(rms_norm(x_BxTxD, p["attn_norm"]), p)
        attn_BxTxD = self._branch(attn_out_BxTxD)
        x_BxTxD = x_BxTxD + attn_BxTxD
        mlp_BxTxD = self._branch(self._mlp(rms_norm(x_BxTxD, p["mlp_norm"]), p))
        x_BxTxD = constrain(x_BxTxD + mlp_BxTxD, self.activation_sharding)
        stats = {"attn_out": rms(attn_BxTxD), "mlp_out": rms(mlp_BxTxD), "block_out": rms(x_BxTxD),
                 "attn_z": jnp.mean(jnp.square(log_z_nxTxN)), "outliers": outlier_percent(x_BxTxD)}
        return x_BxTxD, stats

    def forward(self, tokens_BxT: jax.Array, layer_transform: LayerTransform | None = None):
        """Returns (logits_BxTxV, stats): the RMS of the embedding, of every block's branch
        outputs and residual stream, and of the logits; per block also `attn_z`, the mean squared
        log-partition of its attention logits (ATTENTION_Z_SHARE), and `outliers`, the percent of residual-stream
        features beyond 5 std of their token's mean (models.layers.outlier_percent)."""
        embed_BxTxD = constrain(jnp.take(self.embed[...], tokens_BxT, axis=0).astype(
            self.compute_dtype), self.activation_sharding)
        stacked = {name: param[...] for name, param in self.blocks.items()}
        x_BxTxD, layer_stats = scan_layers(self._block, embed_BxTxD, stacked, layer_transform,
                                           self.scan_unroll)
        h_BxTxD = rms_norm(x_BxTxD, self.final_norm[...])
        readout_DxV = self.embed[...].T if self.readout is None else self.readout[...]
        logits_BxTxV = float32_logits(h_BxTxD, readout_DxV) * self.logit_multiplier
        stats = {"embed_out": rms(embed_BxTxD), **layer_stats, "logits": rms(logits_BxTxV)}
        return logits_BxTxV, stats

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (Kaplan et al.): 6 per parameter but the embedding table's
        (a lookup), counted once more when tied as the readout, plus the attention scores and
        mixing, 6·depth·seq_len·width (grouped-query attention shares keys, not their FLOPs)."""
        embed = math.prod(self.embed.shape)
        n = sum(math.prod(p.shape) for _, p in iter_params(self)) - embed
        depth, width = self.blocks["wq"].shape[0], self.blocks["wq"].shape[-1]
        return 6.0 * (n + (embed if self.readout is None else 0)) + 6.0 * depth * seq_len * width

    def __call__(self, tokens_BxT, layer_transform: LayerTransform | None = None):
        return self.forward(tokens_BxT, layer_transform)[0]
