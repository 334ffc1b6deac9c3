"""Gradient accumulation: the batch's gradient taken over micro-batches inside the compiled step
is the whole batch's gradient to float tolerance, with a fraction of its activation memory; the
step of several LRs trained together accumulates each run's own; bad settings are one line."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_RUN
from flax import nnx

from experiments.compose import compose, to_run_config
from optim import SGDConfig
from scaling.config import ConfigError, ModelConfig, ParamConfig
from scaling.parametrization import build_model
from scaling.steps import TrainState, make_step
from scaling.steps.backprop import accumulated, micro_batches
from scaling.steps.loss import next_token_loss_and_stats

B, T, VOCAB, K = 16, 64, 256, 4
# a mean over 16 rows against the mean of 4 means of 4: float32 sums in another order, a
# relative error of a few 1e-7 per entry; 1e-5 is far below the 3/4 a single micro-batch
# would miss or the factor K a sum instead of a mean would give
RTOL = 1e-5
FLOAT32_EPS = 2.0**-23


@pytest.fixture(scope="module")
def tiny():
    model, parametrization = build_model(ModelConfig(width=32, depth=1, head_dim=16),
                                         ParamConfig("mup", base_width=32, base_depth=1),
                                         VOCAB, seed=0)
    graphdef, params = nnx.split(model)
    tokens_BxT1 = np.random.default_rng(0).integers(0, VOCAB, (B, T + 1)).astype(np.int32)
    return graphdef, params.to_pure_dict(), parametrization, tokens_BxT1[:, :-1], tokens_BxT1[:, 1:]


def test_micro_batches_take_every_kth_row():
    x_BxT = jnp.arange(8 * 3).reshape(8, 3)
    parts = micro_batches(x_BxT, 2)
    assert parts.shape == (2, 4, 3)
    np.testing.assert_array_equal(parts[1], x_BxT[1::2])


def test_accumulated_gradient_is_the_batch_gradient_with_less_memory(tiny):
    graphdef, params, _, inputs_BxT, targets_BxT = tiny
    loss_and_grad = jax.value_and_grad(
        lambda p, x, y: next_token_loss_and_stats(graphdef, p, x, y), has_aux=True)
    compiled = {k: jax.jit(accumulated(loss_and_grad, k)).lower(
        params, inputs_BxT, targets_BxT).compile() for k in (1, K)}
    (loss, _), grads = compiled[1](params, inputs_BxT, targets_BxT)
    (loss_k, _), grads_k = compiled[K](params, inputs_BxT, targets_BxT)
    assert float(loss_k) == pytest.approx(float(loss), rel=RTOL)
    for g, g_k in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_k), strict=True):
        np.testing.assert_allclose(g_k, g, rtol=RTOL, atol=RTOL * float(jnp.max(jnp.abs(g))))
    # the logits and their gradient (B×T×V floats each) dominate the temporaries; a quarter of
    # the rows at once must save at least half of them
    temp = {k: c.memory_analysis().temp_size_in_bytes for k, c in compiled.items()}
    assert temp[K] < temp[1] - B * T * VOCAB * 4 // 2, temp


def test_stacked_runs_accumulate_their_own_gradients(tiny):
    """Two LRs trained together (the vectorized sweep) with accumulation step as without it."""
    graphdef, params, parametrization, inputs_BxT, targets_BxT = tiny
    cfg = SGDConfig(lr=0.1, warmup_steps=0, schedule="constant", clip_norm=0.0)
    after = {}
    for k in (1, K):
        step = make_step(cfg, parametrization, graphdef, total_steps=1, runs=2, grad_accum=k)
        state = TrainState.stack([step.init_state(params, lr) for lr in (0.1, 0.4)])
        after[k], _ = step(state, inputs_BxT, targets_BxT)
    moved = jax.tree.map(lambda a, b: a - b, after[1].params, TrainState.stack([params] * 2))
    for m, p1, pk in zip(jax.tree.leaves(moved), jax.tree.leaves(after[1].params),
                         jax.tree.leaves(after[K].params), strict=True):
        # the updates' float error, and one rounding of the parameter they are added to
        np.testing.assert_allclose(pk, p1, rtol=FLOAT32_EPS,
                                   atol=RTOL * float(jnp.max(jnp.abs(m))))
    np.testing.assert_allclose(after[K].loss_sum, after[1].loss_sum, rtol=RTOL)


@pytest.mark.parametrize(("overrides", "message"), [
    (["train.batch_size=4", "train.grad_accum=3"],
     "train.grad_accum=3: expected a divisor of train.batch_size=4"),
    (["train.grad_accum=0"], "train.grad_accum=0: expected a positive integer"),
    (["optim=mezo", "train.grad_accum=2"], "train.grad_accum=2: expected 1 with optim.name=mezo"),
])
def test_bad_grad_accum_is_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message):
        to_run_config(compose([*TINY_RUN, *overrides]))
