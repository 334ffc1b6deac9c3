"""Objectives MeZO can minimize: (logits_BxTxV, targets_BxT) -> scalar, differentiable or not.

`optim.objective` names an entry of OBJECTIVES (its values: the Objective type); add both to plug
in another.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp

Objective = Literal["cross_entropy", "accuracy"]


def token_cross_entropy(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
    """Each token's cross-entropy, logsumexp minus the target's logit, as optax's integer-label
    loss computes it but for one thing: the target's logit is squeezed out, not indexed, since
    the gradient of an index is a B×T constant XLA folds while compiling (7 s at 32×100000
    tokens; at any shape, time added to the compile)."""
    target_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1).squeeze(-1)
    return jax.nn.logsumexp(logits_BxTxV, axis=-1) - target_BxT


def cross_entropy(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy, the default."""
    return token_cross_entropy(logits_BxTxV, targets_BxT).mean()


def error_rate(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
    """1 − next-token accuracy: piecewise constant, so no gradient; still an objective for MeZO."""
    return 1.0 - jnp.mean(jnp.argmax(logits_BxTxV, axis=-1) == targets_BxT)


OBJECTIVES: dict[Objective, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "cross_entropy": cross_entropy, "accuracy": error_rate}
