"""The models' own config: shapes and numerics, with no scaling rule in it."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

COMPUTE_DTYPES = ("auto", "float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    kind: str = "transformer"  # transformer | mlp
    width: int = 128
    depth: int = 4
    head_dim: int = 32
    mlp_ratio: int = 4
    context: int = 8  # mlp only: bytes of context seen by the byte MLP
    readout_init: str = "normal"  # normal | zero
    embed_std: float = 1.0
    rope_base: float = 10000.0
    # jax.lax.scan's unroll over the layers: true unrolls all (fastest on CPU, measured in
    # docs/performance.md), 1 keeps a rolled loop (compile time flat in depth), k unrolls by k
    scan_unroll: int | bool = True
    compute_dtype: str = "auto"  # auto (bfloat16 on GPU/TPU, float32 on CPU) | float32 | bfloat16


def compute_dtype(name: str) -> jnp.dtype:
    """Matmul and activation dtype; parameters, norms, softmax and the loss stay float32."""
    if name == "auto":
        return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
    return jnp.dtype(name)
