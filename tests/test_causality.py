"""Causality: the logits at position t depend on the tokens at positions <= t only (and, for the
byte MLP, only on the last `context` of them), checked by gradients and by changing tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models.transformer
from scaling.config import ModelConfig, ParamConfig
from scaling.parametrization import build_model

VOCAB, T, CONTEXT = 256, 12, 4
# Distinct, non-zero tokens: embedding row tokens[s] is read at position s only (token 0 is the
# byte MLP's left padding), so a gradient w.r.t. that row is a gradient w.r.t. position s's input.
TOKENS_1xT = 1 + jnp.arange(T)[None, :]


def _model(kind: str):
    cfg = ModelConfig(kind=kind, width=32, depth=2, head_dim=16, context=CONTEXT)
    return build_model(cfg, ParamConfig("mup", base_width=32, base_depth=2), VOCAB, seed=0)[0]


def influence_TxT(model) -> np.ndarray:
    """[t, s] = sum |d(logits[t] · r) / d(embedding row of the token at s)| for a random r."""
    graphdef, params = nnx.split(model)
    params = params.to_pure_dict()
    r_V = jax.random.normal(jax.random.key(1), (VOCAB,))

    def projected_logits_T(embed):
        logits_1xTxV = nnx.merge(graphdef, {**params, "embed": embed})(TOKENS_1xT)
        return logits_1xTxV[0] @ r_V

    # one compiled program: jacrev run op by op compiles each of its many small steps alone
    jac = jax.jit(jax.jacrev(projected_logits_T))(params["embed"])  # (T, V, D) or (T, K, V, D)
    rows = jac[:, TOKENS_1xT[0]] if jac.ndim == 3 else jac[:, :, TOKENS_1xT[0]].swapaxes(1, 2)
    return np.asarray(jnp.abs(rows).reshape(T, T, -1).sum(-1))


def _allowed_TxT(kind: str) -> np.ndarray:
    """Which (t, s) may interact: s <= t, and for the MLP also t - s < context."""
    t, s = np.arange(T)[:, None], np.arange(T)[None, :]
    return (s <= t) & ((t - s < CONTEXT) if kind == "mlp" else True)


@pytest.mark.parametrize("kind", ["transformer", "mlp"])
def test_gradient_respects_causal_window(kind):
    """d logits[t] / d input[s] is exactly zero for s > t (and outside the MLP window), else not."""
    influence = influence_TxT(_model(kind))
    allowed = _allowed_TxT(kind)
    np.testing.assert_array_equal(influence[~allowed], 0.0)
    assert np.all(influence[allowed] > 0)


def test_gradient_check_detects_non_causal_attention(monkeypatch):
    """The gradient check above is not vacuous: attention without the causal mask fails it."""
    def non_causal(q, k, v, scale):
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=False)

    monkeypatch.setattr(models.transformer, "causal_attention", non_causal)
    influence = influence_TxT(_model("transformer"))
    assert np.all(influence[~_allowed_TxT("transformer")] > 0)


@pytest.mark.parametrize("kind", ["transformer", "mlp"])
def test_changing_later_tokens_leaves_earlier_logits_unchanged(kind):
    """Replacing the tokens after position t leaves logits[: t + 1] bit-identical, changes t + 1."""
    model, t = _model(kind), T // 2
    forward = jax.jit(lambda tokens: model(tokens))
    changed_1xT = TOKENS_1xT.at[:, t + 1:].set(200 + jnp.arange(T - t - 1))
    logits_1xTxV, changed_logits_1xTxV = forward(TOKENS_1xT), forward(changed_1xT)
    np.testing.assert_array_equal(logits_1xTxV[:, :t + 1], changed_logits_1xTxV[:, :t + 1])
    assert not np.allclose(logits_1xTxV[:, t + 1], changed_logits_1xTxV[:, t + 1])


def test_mlp_forgets_tokens_older_than_context():
    """The byte MLP's logits at t change with token t - context + 1 but not with t - context."""
    model, t = _model("mlp"), T - 1
    forward = jax.jit(lambda tokens: model(tokens))
    base_1xTxV = forward(TOKENS_1xT)
    oldest_seen = forward(TOKENS_1xT.at[:, t - CONTEXT + 1].set(250))
    too_old = forward(TOKENS_1xT.at[:, t - CONTEXT].set(250))
    assert not np.allclose(base_1xTxV[:, t], oldest_seen[:, t])
    np.testing.assert_array_equal(base_1xTxV[:, t], too_old[:, t])
