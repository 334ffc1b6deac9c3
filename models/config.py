"""The models' own config: shapes and numerics, with no scaling rule in it; and what a model is
told at construction besides its config (multipliers, activation placement)."""

from __future__ import annotations

import dataclasses
from typing import Literal, get_args

import jax
import jax.numpy as jnp

ModelKind = Literal["transformer", "mlp"]  # models.MODELS
ReadoutInit = Literal["normal", "zero"]
Mlp = Literal["gelu", "swiglu"]  # the Transformer's MLP: two matrices, or three with a gate
ComputeDtype = Literal["auto", "float32", "bfloat16"]  # auto: bfloat16 on GPU/TPU, float32 on CPU
COMPUTE_DTYPES = get_args(ComputeDtype)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    kind: ModelKind = "transformer"
    width: int = 128
    depth: int = 4
    head_dim: int = 32
    mlp_ratio: int = 4
    context: int = 8  # mlp only: bytes of context seen by the byte MLP
    readout_init: ReadoutInit = "normal"
    embed_std: float = 1.0
    rope_base: float = 10000.0
    # the modern block's options (Transformer only): RMSNorm on each head's queries and keys,
    # a gated MLP, query heads sharing one key/value head, one matrix as embedding and readout
    qk_norm: bool = False
    mlp: Mlp = "gelu"
    # query heads per key/value head (1: multi-head attention). A ratio, not a count: the
    # key/value heads grow with width like the query heads, so K and V stay hidden matrices
    q_per_kv: int = 1
    tie_embeddings: bool = False
    # jax.lax.scan's unroll over the layers: true unrolls all (fastest on CPU, measured in
    # docs/performance.md), 1 keeps a rolled loop (compile time flat in depth), k unrolls by k
    scan_unroll: int | bool = True
    compute_dtype: ComputeDtype = "auto"
    # 'package.module:function' building the user's own LM (models/factory.py) in place of
    # `kind`; its parameters' roles are inferred from shapes (scaling/inference.py)
    factory: str | None = None

    @property
    def label(self) -> str:
        """How run names call the model: its kind, or its factory function's name."""
        return self.kind if self.factory is None else self.factory.rpartition(":")[2]


@dataclasses.dataclass(frozen=True)
class Runtime:
    """What a model is built with besides its config: the forward multipliers its
    parametrization decides, and where its activations live on a device mesh."""

    logit_multiplier: float = 1.0
    attention_scale: float = 1.0  # the attention logits' scale (1/√d_head under SP)
    branch_multiplier: float = 1.0  # × every residual branch's output (depth rules)
    # on a device mesh, where the residual stream lives (sequences split over the batch axes);
    # None: wherever the compiler puts it (models/layers.py, constrain)
    activation_sharding: jax.sharding.Sharding | None = None
    # a factory model's modules on the readout's path (parameter-path prefixes), whose raw
    # outputs grow with width by design: left out of its forward stats
    readout_modules: tuple[tuple, ...] = ()


def compute_dtype(name: str) -> jnp.dtype:
    """Matmul and activation dtype; parameters, norms, softmax and the loss stay float32."""
    if name == "auto":
        return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
    return jnp.dtype(name)


# the modern block's options: the Transformer's alone, left out of run names at their defaults
BLOCK_OPTIONS = ("qk_norm", "mlp", "q_per_kv", "tie_embeddings")

# SwiGLU's hidden size per head is this multiple of 8 nearest 2/3 · mlp_ratio · head_dim: its
# three matrices then hold about as many parameters as GELU's two at the same mlp_ratio, and
# the hidden size stays exactly proportional to width (heads × a constant)
SWIGLU_ROUND = 8


def mlp_hidden(cfg: ModelConfig) -> int:
    """The MLP's hidden size: mlp_ratio · width for GELU; for SwiGLU heads × (2/3 · mlp_ratio ·
    head_dim rounded to a multiple of SWIGLU_ROUND), e.g. 88 per head of 32 at ratio 4 (2.75 ·
    width: 3.1% more parameters than GELU's 8 · width²)."""
    if cfg.mlp == "gelu":
        return cfg.mlp_ratio * cfg.width
    per_head = max(SWIGLU_ROUND, round(2 * cfg.mlp_ratio * cfg.head_dim / 3 / SWIGLU_ROUND)
                   * SWIGLU_ROUND)
    return cfg.width // cfg.head_dim * per_head
