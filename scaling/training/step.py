"""One training step and evaluation as pure, jitted functions of a train state."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from optim import OptimizerConfig
from scaling.parametrization import build_optimizer


def next_token_loss(graphdef, params, inputs_BxT, targets_BxT) -> jax.Array:
    logits_BxTxV = nnx.merge(graphdef, params)(inputs_BxT).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, targets_BxT).mean()


# lr -> the optimizer at that base LR; built inside the traced step, so lr may be a tracer
OptimizerAt = Callable[[jax.Array | float], optax.GradientTransformation]


def make_train_step(graphdef, tx_at: OptimizerAt, lrs_together: int = 1):
    """state -> state, with the optimizer `tx_at(state["lr"])`.

    The LR lives in the state so that one compiled program trains several LRs (vmap over the
    state when `lrs_together` > 1) exactly as it trains one; the optimizer is built from it
    inside the step, because a relative (sphere) step is not linear in the LR. The state also
    carries a running loss sum, so logged means survive resumes.
    """

    def train_step(state, inputs_BxT, targets_BxT):
        loss, grads = jax.value_and_grad(
            lambda p: next_token_loss(graphdef, p, inputs_BxT, targets_BxT))(state["params"])
        updates, opt_state = tx_at(state["lr"]).update(grads, state["opt_state"],
                                                       state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
                "lr": state["lr"], "loss_sum": state["loss_sum"] + loss,
                "loss_count": state["loss_count"] + 1}

    if lrs_together > 1:
        train_step = jax.vmap(train_step, in_axes=(0, None, None))
    return jax.jit(train_step, donate_argnums=0)


def optimizer_at(cfg: OptimizerConfig, parametrization, *, total_steps: int) -> OptimizerAt:
    """The optimizer make_train_step expects: `cfg` at any base LR, traced or not."""
    return lambda lr: build_optimizer(dataclasses.replace(cfg, lr=lr), parametrization,
                                      total_steps=total_steps)


def init_train_state(params, tx_at: OptimizerAt, lr: float) -> dict:
    """The optimizer state does not depend on the LR, so one template serves every LR."""
    return {"params": params, "opt_state": tx_at(lr).init(params),
            "lr": jnp.asarray(lr, jnp.float32),
            "loss_sum": jnp.zeros((), jnp.float32), "loss_count": jnp.zeros((), jnp.int32)}


def make_eval(graphdef, batches, lrs_together: int = 1):
    """params -> one validation loss per LR trained together."""
    loss_fn = lambda p, x, y: next_token_loss(graphdef, p, x, y)
    if lrs_together > 1:
        loss_fn = jax.vmap(loss_fn, in_axes=(0, None, None))
    loss_fn = jax.jit(loss_fn)
    return lambda params: np.mean([np.atleast_1d(loss_fn(params, x, y)) for x, y in batches],
                                  axis=0).tolist()


def flops_per_token(model: nnx.Module, specs, seq_len: int) -> float:
    """6 FLOPs per non-embedding parameter plus the model's attention term (Kaplan et al.)."""
    n = sum(math.prod(s.shape) for s in specs.values() if s.role != "input")
    return 6.0 * n + model.attention_flops_per_token(seq_len)
