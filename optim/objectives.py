"""Objectives MeZO can minimize: (logits_BxTxV, targets_BxT) -> scalar, differentiable or not.

`optim.objective` names an entry of OBJECTIVES (its values: the Objective type); add both to plug
in another.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import optax

Objective = Literal["cross_entropy", "accuracy"]


def cross_entropy(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy, the default."""
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, targets_BxT).mean()


def error_rate(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
    """1 − next-token accuracy: piecewise constant, so no gradient; still an objective for MeZO."""
    return 1.0 - jnp.mean(jnp.argmax(logits_BxTxV, axis=-1) == targets_BxT)


OBJECTIVES: dict[Objective, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "cross_entropy": cross_entropy, "accuracy": error_rate}
