"""Forward multipliers for models written outside this package: small modules a user's forward
pass applies, whose values a parametrization sets (`apply_runtime`). Shapes tell a rule which
parameters scale how, but not where the forward pass multiplies: μP's 1/m on the logits, the
attention logits' 1/d, a depth rule's factor on every residual branch. Each helper names the
Runtime field it takes, so nothing looks for it by name.
"""

from __future__ import annotations

import math
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import Runtime


class ForwardMultiplier(nnx.Module):
    """x × a constant that the parametrization chooses (1 until it does)."""

    runtime_field: ClassVar[str]  # the Runtime field whose value it takes

    def __init__(self):
        self.value = 1.0

    def __call__(self, x: jax.Array) -> jax.Array:
        # skipped at 1 so that a model under SP computes exactly what it did without the helper
        return x if self.value == 1.0 else x * jnp.asarray(self.value, x.dtype)


class ReadoutMultiplier(ForwardMultiplier):
    """× the readout's output (the logits): μP's 1/width_mult. Apply it to the last layer's
    output, as the `mup` library's MuReadout does inside its readout."""

    runtime_field = "logit_multiplier"


class BranchMultiplier(ForwardMultiplier):
    """× a residual branch's output before it joins the stream: a depth rule's r^(−α); apply it
    to every branch of the blocks marked residual (models.tagged.mark_residual)."""

    runtime_field = "branch_multiplier"


class AttentionScale(nnx.Module):
    """An `attention_fn` for nnx.MultiHeadAttention whose logits are scaled by the
    parametrization's attention scale (μP: ∝ 1/head_dim) instead of a fixed 1/√head_dim:
    `nnx.MultiHeadAttention(..., attention_fn=AttentionScale(head_dim))`."""

    runtime_field: ClassVar[str] = "attention_scale"

    def __init__(self, head_dim: int):
        self.head_dim = head_dim
        self.value = head_dim**-0.5  # SP's scale until a parametrization sets one

    def __call__(self, query, key, value, **kwargs):
        # nnx.dot_product_attention divides the query by √head_dim; this undoes it
        factor = self.value * math.sqrt(query.shape[-1])
        return nnx.dot_product_attention(query * jnp.asarray(factor, query.dtype), key, value,
                                         **kwargs)


MULTIPLIERS = (ForwardMultiplier, AttentionScale)


def multiplier_modules(model: nnx.Module) -> list[tuple[tuple, nnx.Module]]:
    """Every forward-multiplier helper in the model, with its path."""
    return [(tuple(path), node) for path, node in nnx.iter_graph(model)
            if isinstance(node, MULTIPLIERS)]


def apply_runtime(model: nnx.Module, runtime: Runtime) -> nnx.Module:
    """Sets every helper of `model` to its value in `runtime`; returns the model."""
    for _, helper in multiplier_modules(model):
        helper.value = float(getattr(runtime, helper.runtime_field))
    return model
