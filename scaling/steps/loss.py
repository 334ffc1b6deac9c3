"""The next-token loss every step kind minimizes by default, its validation, and its cost."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from optim.objectives import cross_entropy
from scaling.steps.state import over_runs


def next_token_loss(graphdef, params, inputs_BxT, targets_BxT) -> jax.Array:
    return next_token_loss_and_stats(graphdef, params, inputs_BxT, targets_BxT)[0]


def next_token_loss_and_stats(graphdef, params, inputs_BxT, targets_BxT):
    """(loss, the model's forward stats); unused stats cost nothing under jit."""
    logits_BxTxV, stats = nnx.merge(graphdef, params).forward(inputs_BxT)
    loss = cross_entropy(logits_BxTxV.astype(jnp.float32), targets_BxT)
    return loss, stats


def make_eval(graphdef, batches, runs: int):
    """params of `runs` runs stacked on a leading axis -> one validation loss per run."""
    loss_fn = jax.jit(over_runs(lambda p, x, y: next_token_loss(graphdef, p, x, y), runs,
                                (0, None, None)))
    return lambda params: np.mean([np.asarray(loss_fn(params, x, y)) for x, y in batches],
                                  axis=0).tolist()
