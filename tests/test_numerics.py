"""Numerics options of the models: the layer loop (scanned or unrolled) and the compute dtype.

Unrolling changes how XLA schedules the layers, not what they compute. bfloat16 compute keeps
float32 master weights and optimizer state, takes norms, softmax and the loss in float32, and runs
the matmuls and activations in bfloat16."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from optim import AdamWConfig
from scaling.config import ModelConfig, ParamConfig
from scaling.coord_check import coordinate_check
from scaling.parametrization import build_model
from scaling.steps import make_step
from scaling.steps.loss import next_token_loss

B, T, VOCAB = 4, 32, 256
PARAM = ParamConfig("mup", base_width=32, base_depth=2)
OPTIM = AdamWConfig(lr=1e-2, weight_decay=0.1, schedule="constant", warmup_steps=0, clip_norm=1.0)


def _batch():
    tokens_BxT1 = (jnp.arange(B * (T + 1)) * 7 % VOCAB).reshape(B, T + 1)
    return tokens_BxT1[:, :-1], tokens_BxT1[:, 1:]


def _loss_and_grads(model_cfg: ModelConfig):
    model, _ = build_model(model_cfg, PARAM, VOCAB, seed=0)
    graphdef, params = nnx.split(model)
    return jax.jit(jax.value_and_grad(
        lambda p: next_token_loss(graphdef, p, *_batch())))(params.to_pure_dict())


@pytest.mark.parametrize(("kind", "unroll"), [("transformer", True), ("mlp", 2)])
def test_unrolled_and_scanned_layers_give_the_same_loss_and_gradients(kind, unroll):
    """scan_unroll only changes the program's shape: a rolled loop (1), every layer unrolled
    (true) and 2 layers per iteration over 3 layers (a remainder) agree."""
    base = ModelConfig(kind=kind, width=64, depth=3, head_dim=32)
    reference_loss, reference_grads = _loss_and_grads(dataclasses.replace(base, scan_unroll=1))
    loss, grads = _loss_and_grads(dataclasses.replace(base, scan_unroll=unroll))
    np.testing.assert_allclose(loss, reference_loss, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(reference_grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def _one_step(compute_dtype: str):
    model, parametrization = build_model(
        ModelConfig(width=64, depth=2, head_dim=32, compute_dtype=compute_dtype), PARAM, VOCAB,
        seed=0)
    graphdef, params = nnx.split(model)
    params = params.to_pure_dict()
    loss_and_grad = jax.jit(jax.value_and_grad(
        lambda p: next_token_loss(graphdef, p, *_batch())))
    loss, grads = loss_and_grad(params)
    # the step donates its state: keep `params` (the init) alive for the tests that read it
    step = make_step(OPTIM, parametrization, graphdef, total_steps=1)
    state, _ = step(step.init_state(jax.tree.map(jnp.copy, params), OPTIM.lr), *_batch())
    measured = {"loss_init": float(loss), "grad_norm_init": float(optax.global_norm(grads)),
                "loss_after_step": float(loss_and_grad(state.params)[0])}
    return graphdef, params, state, measured


@pytest.fixture(scope="module")
def bf16_step():
    return _one_step("bfloat16")


# Golden numbers of test_golden.py's run in bfloat16 compute (jax 0.10.2, CPU). bf16 rounds each
# matmul operand to 8 bits of mantissa, so its tolerance is 1e-3, not float32's 1e-5; the float32
# numbers (5.85615, 0.964299, 4.62335) differ from these by 1e-4 relative.
GOLDEN_BF16 = {"loss_init": 5.855714321136475, "grad_norm_init": 0.9641335010528564,
               "loss_after_step": 4.622708320617676}


@pytest.mark.parametrize("name", list(GOLDEN_BF16))
def test_bf16_golden_value(bf16_step, name):
    assert bf16_step[3][name] == pytest.approx(GOLDEN_BF16[name], rel=1e-3), (
        f"golden bf16 {name}: update only after an intentional change to the model's numerics")


def test_bf16_keeps_float32_master_weights_and_optimizer_state(bf16_step):
    _, params, state, _ = bf16_step
    for tree in (params, state.params, state.opt_state):
        floats = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
        assert floats and all(x.dtype == jnp.float32 for x in floats)


def _dot_operand_dtypes(graphdef, params) -> list[tuple[str, str]]:
    jaxpr = jax.make_jaxpr(lambda p: nnx.merge(graphdef, p)(_batch()[0]))(params)

    def walk(eqns):
        for eqn in eqns:
            if eqn.primitive.name == "dot_general":
                yield tuple(str(v.aval.dtype) for v in eqn.invars)
            for sub in jax.core.subjaxprs(eqn) if hasattr(jax.core, "subjaxprs") else []:
                yield from walk(sub.eqns)
            for value in eqn.params.values():
                inner = getattr(value, "jaxpr", None)
                if inner is not None and hasattr(inner, "eqns"):
                    yield from walk(inner.eqns)
    return list(walk(jaxpr.jaxpr.eqns))


def test_bf16_runs_every_matmul_in_bf16_and_returns_float32_logits(bf16_step):
    graphdef, params, _, _ = bf16_step
    dots = _dot_operand_dtypes(graphdef, params)
    # the scan body appears once: 6 block matmuls, attention's two products, the readout
    assert len(dots) >= 9 and all(d == ("bfloat16", "bfloat16") for d in dots), dots
    logits_BxTxV, stats = nnx.merge(graphdef, params).forward(_batch()[0])
    assert logits_BxTxV.dtype == jnp.float32
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(stats))


def test_float32_compute_has_no_bf16_anywhere():
    model, _ = build_model(ModelConfig(width=64, depth=2, head_dim=32, compute_dtype="float32"),
                           PARAM, VOCAB, seed=0)
    graphdef, params = nnx.split(model)
    dots = _dot_operand_dtypes(graphdef, params.to_pure_dict())
    assert len(dots) >= 9 and all(d == ("float32", "float32") for d in dots), dots


def test_bf16_coordinates_stay_flat_under_mup():
    """The coordinate check's claim holds in bf16 too: block outputs within 1.3× over 8× width."""
    tokens_BxT1 = jax.random.randint(jax.random.key(0), (B, T + 1), 0, VOCAB)
    model_cfg = ModelConfig(depth=1, head_dim=32, compute_dtype="bfloat16")
    widths = [64, 512]
    stats = coordinate_check(model_cfg, ParamConfig("mup", base_width=64, base_depth=1),
                             dataclasses.replace(OPTIM, weight_decay=0.0, clip_norm=0.0),
                             widths, 3, (tokens_BxT1[:, :-1], tokens_BxT1[:, 1:]))
    for step in range(4):
        for module in [k for k in stats[64][step] if k.split("/")[0] in ("attn_out", "mlp_out",
                                                                          "block_out")]:
            values = [stats[w][step][module] for w in widths]
            assert max(values) / min(values) < 1.3, (step, module, values)


def _train(overrides: list[str]) -> dict:
    from experiments.compose import compose, to_run_config
    from scaling.training.loop import train

    return train(to_run_config(compose(overrides)))


# measured: 2.98373 (float32) vs 2.98374 (bfloat16) after 24 tiny steps; the tolerance leaves
# room for longer runs and other CPUs, far below what bf16 master weights or a bf16 loss cost
BF16_TRAIN_TOLERANCE = 0.01


@pytest.mark.slow
def test_bf16_trains_like_float32(tiny_run):
    """A short run of the tiny Transformer on the default corpus: same validation loss (slow:
    two 24-step runs, 20 s; the default suite holds bf16 to its golden step, its matmul dtypes
    and its coordinate check)."""
    run = [*tiny_run, "train.steps=24", "train.eval_every=24", "train.checkpoint_every=24"]
    fp32 = _train([*run, "model.compute_dtype=float32"])
    bf16 = _train([*run, "model.compute_dtype=bfloat16"])
    assert fp32["run_dir"] != bf16["run_dir"]  # the dtype is part of what is trained
    assert abs(bf16["val_loss"] - fp32["val_loss"]) < BF16_TRAIN_TOLERANCE, (fp32, bf16)
    assert bf16["val_loss"] < 4.0  # it learned: ln(256) = 5.55 at init


@pytest.mark.slow
def test_bf16_trains_the_default_model_like_float32(tmp_path):
    """The default run (width 128, depth 4, 300 steps) in bf16 and float32 compute: measured
    val loss 1.4775 (float32) and 1.4754 (bfloat16) on CPU, jax 0.10.2."""
    common = [f"train.out_dir={tmp_path}", "logging.wandb_mode=disabled",
              "logging.progress=false"]
    fp32 = _train([*common, "model.compute_dtype=float32"])
    bf16 = _train([*common, "model.compute_dtype=bfloat16"])
    print(f"val loss float32 {fp32['val_loss']:.4f}, bfloat16 {bf16['val_loss']:.4f}")
    assert abs(bf16["val_loss"] - fp32["val_loss"]) < BF16_TRAIN_TOLERANCE, (fp32, bf16)


def _attention_by_hand(q, k, v, scale):
    """Causal softmax attention in float64, from its definition."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    logits = np.einsum("btnh,bsnh->bnts", q, k) * scale
    T = q.shape[1]
    logits = np.where(np.tril(np.ones((T, T), bool)), logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", weights, v)


def test_attention_takes_the_fused_kernel_where_the_platform_has_one(monkeypatch):
    """On CPU the model's attention is XLA's and equals softmax attention by hand (float32 to
    1e-5; bfloat16 to its 8-bit mantissa). On a GPU with 16-bit operands it asks for cuDNN's
    fused kernel first and falls back to XLA's when cuDNN refuses (here: not installed), with
    the same result."""
    from models import layers

    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, (2, 16, 4, 32), jnp.float32) for key in keys)
    scale = 32**-0.5
    expected = _attention_by_hand(q, k, v, scale)
    np.testing.assert_allclose(layers.causal_attention(q, k, v, scale), expected, rtol=1e-5,
                               atol=1e-5)
    bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    on_cpu = layers.causal_attention(*bf16, scale)
    np.testing.assert_allclose(np.asarray(on_cpu, np.float32), expected, rtol=0.05, atol=0.05)
    assert not layers.fused_attention_available(jnp.bfloat16)

    asked = []
    attend = jax.nn.dot_product_attention

    def recording(*args, implementation=None, **kwargs):
        asked.append(implementation)
        return attend(*args, implementation=implementation, **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", recording)
    monkeypatch.setattr(layers.jax, "default_backend", lambda: "gpu")
    assert layers.fused_attention_available(jnp.bfloat16)
    assert not layers.fused_attention_available(jnp.float32)
    on_gpu = layers.causal_attention(*bf16, scale)
    assert asked == ["cudnn", "xla"]
    np.testing.assert_array_equal(np.asarray(on_gpu), np.asarray(on_cpu))
