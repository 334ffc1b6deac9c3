"""Golden numbers: loss, gradient norm and one AdamW step of a tiny μP Transformer on a fixed
batch, so that any unintended change to init, model, parametrization or optimizer is caught."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from optim import AdamWConfig
from optim.objectives import token_cross_entropy
from scaling.config import ModelConfig, ParamConfig
from scaling.parametrization import build_model
from scaling.steps import make_step
from scaling.steps.loss import next_token_loss

# Measured on CPU (float32) with jax 0.10.2 / Python 3.11 and jax 0.12.0.1 / Python 3.12: the losses
# agree to the last bit, the gradient norm differs by 6e-8 relative (0.9642991423606873 on 0.12);
# rtol 1e-5 covers both with room for other CPUs' float32 rounding, and is far below any real change.
GOLDEN = {
    "loss_init": 5.856152534484863,
    "grad_norm_init": 0.9642990827560425,
    "loss_after_step": 4.623348712921143,
}
RTOL = 1e-5
WHEN_TO_UPDATE = (
    "golden {name}: got {got!r}, expected {expected!r}. Update GOLDEN only after an intentional "
    "change to init, model, parametrization or optimizer (say which in the commit); never to make "
    "this test pass without understanding why the number moved.")

B, T, VOCAB = 4, 32, 256


@pytest.fixture(scope="module")
def measured() -> dict[str, float]:
    """The golden quantities computed by the current code."""
    tokens_BxT1 = (jnp.arange(B * (T + 1)) * 7 % VOCAB).reshape(B, T + 1)
    inputs_BxT, targets_BxT = tokens_BxT1[:, :-1], tokens_BxT1[:, 1:]
    model, parametrization = build_model(ModelConfig(width=64, depth=2, head_dim=32),
                                         ParamConfig("mup", base_width=32, base_depth=2),
                                         VOCAB, seed=0)
    cfg = AdamWConfig(lr=1e-2, weight_decay=0.1, schedule="constant",
                      warmup_steps=0, clip_norm=1.0)
    graphdef, params = nnx.split(model)
    params = params.to_pure_dict()
    loss_and_grad = jax.jit(jax.value_and_grad(
        lambda p: next_token_loss(graphdef, p, inputs_BxT, targets_BxT)))
    loss, grads = loss_and_grad(params)
    out = {"loss_init": float(loss), "grad_norm_init": float(optax.global_norm(grads))}
    step = make_step(cfg, parametrization, graphdef, total_steps=1)
    state, _ = step(step.init_state(params, cfg.lr), inputs_BxT, targets_BxT)
    out["loss_after_step"] = float(loss_and_grad(state.params)[0])
    return out


@pytest.mark.parametrize("name", list(GOLDEN))
def test_golden_value(measured, name):
    """The loss at init, its gradient's global norm and the loss after one step are unchanged."""
    got, expected = measured[name], GOLDEN[name]
    assert got == pytest.approx(expected, rel=RTOL), WHEN_TO_UPDATE.format(
        name=name, got=got, expected=expected)


def test_one_step_decreases_loss(measured):
    """Sanity of the golden run itself: one AdamW step on the batch lowers its loss."""
    assert measured["loss_after_step"] < measured["loss_init"]


def test_token_cross_entropy_is_optax_integer_label_loss():
    """The loss every step minimizes is optax's integer-label cross-entropy, value and gradient,
    to the bit (written out only so that its gradient compiles without a folded B×T constant)."""
    logits_BxTxV = 3 * jax.random.normal(jax.random.key(0), (B, T, VOCAB))
    targets_BxT = jax.random.randint(jax.random.key(1), (B, T), 0, VOCAB)
    ours = lambda x: token_cross_entropy(x, targets_BxT).mean()
    theirs = lambda x: optax.softmax_cross_entropy_with_integer_labels(x, targets_BxT).mean()
    assert jnp.array_equal(ours(logits_BxTxV), theirs(logits_BxTxV))
    assert jnp.array_equal(jax.grad(ours)(logits_BxTxV), jax.grad(theirs)(logits_BxTxV))
