"""Objectives MeZO can minimize: (logits_BxTxV, targets_BxT) -> scalar, differentiable or not.

`optim.objective` names an entry of OBJECTIVES; add an entry to plug in another. jax is imported
inside the functions, so that configs are validated without loading it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def cross_entropy(logits_BxTxV, targets_BxT):
    """Mean next-token cross-entropy, the default."""
    import optax

    return optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, targets_BxT).mean()


def error_rate(logits_BxTxV, targets_BxT):
    """1 − next-token accuracy: piecewise constant, so no gradient; still an objective for MeZO."""
    import jax.numpy as jnp

    return 1.0 - jnp.mean(jnp.argmax(logits_BxTxV, axis=-1) == targets_BxT)


OBJECTIVES: dict[str, Callable[[Any, Any], Any]] = {
    "cross_entropy": cross_entropy, "accuracy": error_rate}
