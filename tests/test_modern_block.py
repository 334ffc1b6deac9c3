"""The modern block's options (models/config.py): QK-norm, a SwiGLU MLP, grouped-query
attention and tied embeddings, each a Transformer option whose parameters carry their roles.

Each option is checked by what it computes (against a hand computation or an equivalent plain
model), by its parameters (roles, shapes, counts and FLOPs by hand), and by the whole pipeline
with all four on: a Muon run logs its indicators, checkpoints and resumes bit for bit; MeZO moves
every parameter; a 4×2 mesh lays the new axes out; the coordinate check holds under μP and not
under SP.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_RUN
from flax import nnx
from jax.sharding import PartitionSpec as P
from test_train_run import _assert_ends_like, _crash_at, _metrics

from experiments.compose import compose, to_run_config
from models.config import ModelConfig, mlp_hidden
from optim import AdamWConfig, SGDConfig
from scaling.config import ConfigError, ParamConfig
from scaling.coord_check import coordinate_check
from scaling.parametrization import build_model, make_parametrization
from scaling.steps import make_step
from scaling.training.loop import model_on_mesh, train

pytestmark = pytest.mark.usefixtures("restore_root_logging")

VOCAB, D, L, H = 256, 64, 2, 32
OPTIONS = {
    "qk_norm": {"qk_norm": True},
    "swiglu": {"mlp": "swiglu"},
    "gqa": {"q_per_kv": 2},
    "tied": {"tie_embeddings": True},
}
ALL = {k: v for option in OPTIONS.values() for k, v in option.items()}
# all four on, two query heads per key/value head at the base width too; a tied embedding read
# out at std 1 gives logits of RMS √base_width at init, so a small one (docs)
MODERN = ["model.qk_norm=true", "model.mlp=swiglu", "model.q_per_kv=2",
          "model.tie_embeddings=true", "model.embed_std=0.1", "param.base_width=64"]


def _model(param: str = "mup", width: int = D, **options):
    cfg = ModelConfig(width=width, depth=L, head_dim=H, **options)
    return build_model(cfg, ParamConfig(param, base_width=D, base_depth=L), VOCAB, seed=0)


def _shapes(model) -> dict[str, tuple[tuple[int, ...], str]]:
    _, parametrization = model
    return {"/".join(map(str, path)): (spec.shape, spec.role)
            for path, spec in parametrization.specs.items()}


def _logits(model, tokens_BxT):
    """The model's logits from one compiled program (eager, each layer's ops run one by one)."""
    graphdef, params = nnx.split(model)
    return jax.jit(lambda params: nnx.merge(graphdef, params)(tokens_BxT))(params)


def _tokens(batch: int = 2, seq: int = 16, seed: int = 0):
    return jax.random.randint(jax.random.key(seed), (batch, seq), 0, VOCAB)


def _hand_count(**options) -> dict[str, int]:
    """Parameters by hand: non-embedding ones, and the embedding table."""
    F = 88 * (D // H) if options.get("mlp") == "swiglu" else 4 * D
    KV = D // options.get("q_per_kv", 1)
    block = 2 * D + D * D + 2 * D * KV + D * D + (3 if options.get("mlp") == "swiglu" else 2) * D * F
    block += 2 * H if options.get("qk_norm") else 0
    readout = 0 if options.get("tie_embeddings") else D * VOCAB
    return {"non_embedding": L * block + D + readout, "embedding": VOCAB * D}


@pytest.mark.parametrize("name", [*OPTIONS, "all"])
def test_each_option_has_its_parameters_roles_and_counts(name):
    options = ALL if name == "all" else OPTIONS[name]
    shapes = _shapes(_model(**options))
    plain = _shapes(_model())
    added = {k: v for k, v in shapes.items() if k not in plain}
    if options.get("qk_norm"):
        assert added.pop("blocks/q_norm") == added.pop("blocks/k_norm") == ((L, H), "vector")
    if options.get("mlp") == "swiglu":
        F = mlp_hidden(ModelConfig(width=D, head_dim=H, mlp="swiglu"))
        assert F == 176  # 88 per head of 32: the multiple of 8 nearest 2/3 · 4 · 32
        assert added.pop("blocks/w_gate") == shapes["blocks/w_up"] == ((L, D, F), "hidden")
        assert shapes["blocks/w_down"] == ((L, F, D), "hidden")
    assert not added
    KV = D // options.get("q_per_kv", 1)
    assert shapes["blocks/wk"] == shapes["blocks/wv"] == ((L, D, KV), "hidden")
    assert shapes["blocks/wq"] == ((L, D, D), "hidden")
    assert ("readout" in shapes) is not options.get("tie_embeddings", False)
    hand = _hand_count(**options)
    total = sum(math.prod(shape) for shape, _ in shapes.values())
    assert total == hand["non_embedding"] + hand["embedding"]


@pytest.mark.parametrize("name", [*OPTIONS, "all"])
def test_flops_per_token_is_the_hand_count(name):
    """6 per non-embedding parameter (the tied table once more, as the readout) plus attention's
    6·depth·seq_len·width."""
    options = ALL if name == "all" else OPTIONS[name]
    model, _ = _model(**options)
    hand = _hand_count(**options)
    matmul = hand["non_embedding"] + (hand["embedding"] if options.get("tie_embeddings") else 0)
    assert model.flops_per_token(128) == 6 * matmul + 6 * L * 128 * D


def test_swiglu_hidden_stays_proportional_to_width():
    """Every width dimension grows by the same factor, as the rules need; parameters within 5%
    of GELU's at the same mlp_ratio (rounding to 8 moves 2/3 · 4 · 32 ≈ 85 by at most 4)."""
    for head_dim in (32, 64, 128):
        ratios = {mlp_hidden(ModelConfig(width=w, head_dim=head_dim, mlp="swiglu")) / w
                  for w in (head_dim, 4 * head_dim, 16 * head_dim)}
        (ratio,) = ratios
        assert abs(3 * ratio / 8 - 1) < 0.05, (head_dim, ratio)


def test_gqa_equals_multi_head_attention_with_each_key_value_head_repeated():
    """q_per_kv=2: the same logits as multi-head attention whose K and V matrices repeat each
    key/value head's columns for the query heads it serves."""
    grouped, _ = _model(q_per_kv=2, width=128)
    plain, _ = _model(width=128)
    g_state, p_state = nnx.state(grouped, nnx.Param), nnx.state(plain, nnx.Param)
    params = g_state.to_pure_dict()
    full = jax.tree.map(lambda x: x, params)
    for name in ("wk", "wv"):
        w_LxDxKxH = params["blocks"][name].reshape(L, 128, 2, H)
        full["blocks"][name] = jnp.repeat(w_LxDxKxH, 2, axis=2).reshape(L, 128, 128)
    p_state.replace_by_pure_dict(full)
    nnx.update(plain, p_state)
    tokens = _tokens()
    np.testing.assert_allclose(_logits(grouped, tokens), _logits(plain, tokens), rtol=1e-5,
                               atol=1e-5)


def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys():
    """With QK-norm, scaling W_q and W_k by 10 changes nothing; without it, it does."""
    tokens = _tokens()
    for qk_norm in (True, False):
        model, _ = _model(qk_norm=qk_norm)
        before = _logits(model, tokens)
        model.blocks["wq"][...] = model.blocks["wq"][...] * 10
        model.blocks["wk"][...] = model.blocks["wk"][...] * 10
        moved = float(jnp.max(jnp.abs(_logits(model, tokens) - before)))
        assert (moved < 1e-4) if qk_norm else (moved > 1e-2), (qk_norm, moved)


def test_swiglu_is_silu_of_the_gate_times_the_up_projection():
    model, _ = _model(mlp="swiglu")
    p = {k: v[...][0] for k, v in model.blocks.items()}
    h_BxTxD = jax.random.normal(jax.random.key(1), (2, 3, D))
    gate, up = np.asarray(h_BxTxD @ p["w_gate"]), np.asarray(h_BxTxD @ p["w_up"])
    by_hand = (gate / (1 + np.exp(-gate)) * up) @ np.asarray(p["w_down"])
    np.testing.assert_allclose(model._mlp(h_BxTxD, p), by_hand, rtol=1e-4, atol=1e-5)


def test_tied_model_is_the_untied_one_with_its_readout_set_to_the_embedding_transpose():
    """Tied: the untied model's logits (μP's 1/m on them, m = 2 here) when its readout holds
    Eᵀ, and the embedding's gradient is the sum of the untied embedding's and readout's."""
    tied, parametrization = _model(width=2 * D, tie_embeddings=True)
    untied, untied_parametrization = _model(width=2 * D)
    assert tied.readout is None
    assert parametrization.logit_multiplier == untied_parametrization.logit_multiplier == 0.5
    params = nnx.state(tied, nnx.Param).to_pure_dict()
    as_untied = {**params, "readout": params["embed"].T}
    graphdef_t, graphdef_u = nnx.graphdef(tied), nnx.graphdef(untied)
    tokens = _tokens()

    @functools.partial(jax.jit, static_argnums=0)
    def loss(graphdef, params):
        return jnp.mean(jax.nn.log_softmax(nnx.merge(graphdef, params)(tokens))[..., 0])

    state_u = nnx.state(untied, nnx.Param)
    state_u.replace_by_pure_dict(as_untied)
    np.testing.assert_allclose(loss(graphdef_t, nnx.state(tied, nnx.Param)),
                               loss(graphdef_u, state_u), rtol=1e-6)
    grad_t = jax.jit(jax.grad(loss, argnums=1), static_argnums=0)(graphdef_t, nnx.state(tied, nnx.Param)).to_pure_dict()
    grad_u = jax.jit(jax.grad(loss, argnums=1), static_argnums=0)(graphdef_u, state_u).to_pure_dict()
    np.testing.assert_allclose(grad_t["embed"], grad_u["embed"] + grad_u["readout"].T,
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("overrides, field", [
    (["model=mlp", "model.qk_norm=true"], "model.qk_norm"),
    (["model=mlp", "model.mlp=swiglu"], "model.mlp"),
    (["model.q_per_kv=3"], "model.q_per_kv"),
    (["model.q_per_kv=2", "param.base_width=32"], "param.base_width"),
    (["model.tie_embeddings=true", "model.readout_init=zero"], "model.readout_init"),
    (["model.tie_embeddings=true", "param=hyperp", "optim=muonh"], "model.tie_embeddings"),
])
def test_bad_options_name_their_field(overrides, field):
    with pytest.raises(ConfigError, match=f"^{field}="):
        to_run_config(compose([*TINY_RUN, *overrides]))


def test_modern_preset_is_qk_norm_and_swiglu_untied():
    model = to_run_config(compose(["model=modern"])).model
    assert (model.kind, model.qk_norm, model.mlp, model.q_per_kv, model.tie_embeddings) == (
        "transformer", True, "swiglu", 1, False)


def test_unrolled_and_scanned_layers_agree_with_every_option():
    model, _ = _model(**ALL)
    graphdef, params = nnx.split(model)
    tokens = _tokens()

    def loss(params, unroll):
        m = nnx.merge(graphdef, params)
        m.scan_unroll = unroll
        return jnp.mean(jax.nn.log_softmax(m(tokens))[..., 0])

    (a, ga), (b, gb) = (jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, u)
                        for u in (True, 1))
    np.testing.assert_allclose(a, b, rtol=1e-6)
    chex.assert_trees_all_close(ga, gb, rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("modern")
    return train(to_run_config(compose([*TINY_RUN, *MODERN, "optim=muon",
                                        "logging.indicators=true", f"train.out_dir={out}"])))


def test_muon_run_logs_indicators_for_the_new_parameters(uninterrupted):
    records = _metrics(uninterrupted["run_dir"])
    assert [r["step"] for r in records] == [3, 6, 9, 12]
    assert math.isfinite(uninterrupted["val_loss"])
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    last = records[-1]
    assert {"attn_z/0", "attn_z/1", "update_ratio/vector.block.finite",
            "update_ratio/hidden.block", "update_ratio/input"} <= last.keys()
    assert "update_ratio/output" not in last  # tied: no readout group
    assert all(math.isfinite(last[k]) for k in last if isinstance(last[k], float))


def test_a_crashed_modern_run_resumes_bit_exact(uninterrupted, tmp_path, monkeypatch):
    cfg = to_run_config(compose([*TINY_RUN, *MODERN, "optim=muon", "logging.indicators=true",
                                 f"train.out_dir={tmp_path}"]))
    _crash_at(monkeypatch, crash_step=10)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg)
    resumed = train(cfg)
    _assert_ends_like(Path(resumed["run_dir"]), uninterrupted)


def test_mezo_perturbs_and_moves_every_parameter():
    cfg = to_run_config(compose([*TINY_RUN, *MODERN, "optim=mezo", "optim.warmup_steps=0"]))
    model, parametrization = build_model(cfg.model, cfg.param, VOCAB, seed=0)
    graphdef, params = nnx.split(model)
    params = params.to_pure_dict()
    step = make_step(cfg.optim, parametrization, graphdef, total_steps=4, seed=0)
    state = step.init_state(params, cfg.optim.lr)
    tokens = _tokens(4, 33)
    state, _ = step(state, tokens[:, :-1], tokens[:, 1:])
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), state.params, params)
    flat = jax.tree_util.tree_flatten_with_path(moved)[0]
    assert len(flat) == 13 and all(v > 0 for _, v in flat), flat


def test_a_4x2_mesh_lays_out_the_new_axes():
    cfg = to_run_config(compose([*TINY_RUN, *MODERN, "model.width=128", "mesh.fsdp=4",
                                 "mesh.tensor=2"]))
    blocks = model_on_mesh(cfg, VOCAB).params["blocks"]
    assert blocks["wk"].sharding.spec == P(None, "fsdp", "tensor")  # 64 columns split in 2
    assert blocks["w_gate"].sharding.spec == P(None, "fsdp", "tensor")
    assert all(axis is None for axis in blocks["q_norm"].sharding.spec)  # kept whole
    assert blocks["wk"].addressable_shards[0].data.shape == (2, 128 // 4, 64 // 2)


@pytest.fixture(scope="module")
def coordinates():
    """The coordinate check with all four options on, μP and SP, widths 64 and 512 (one
    initialization, random tokens, AdamW at a constant 1e-2, 3 steps)."""
    tokens_BxT1 = jax.random.randint(jax.random.key(0), (4, 33), 0, VOCAB)
    model_cfg = ModelConfig(depth=1, head_dim=H, embed_std=0.1, **ALL)
    optim = AdamWConfig(lr=1e-2, schedule="constant", warmup_steps=0, clip_norm=0.0)
    return {param: coordinate_check(model_cfg, ParamConfig(param, base_width=64, base_depth=1),
                                    optim, [64, 512], 3, (tokens_BxT1[:, :-1], tokens_BxT1[:, 1:]))
            for param in ("mup", "sp")}


def _spreads(stats, step):
    modules = [k for k in stats[64][step] if k.split("/")[0] in ("embed_out", "attn_out",
                                                                   "mlp_out", "block_out")]
    return {m: stats[512][step][m] / stats[64][step][m] for m in modules}


def test_coordinates_stay_flat_under_mup_with_every_option(coordinates):
    """Block outputs within 1.3× over 8× width at init and after each step under μP; under SP
    they grow past 2× by the last step."""
    for step in range(4):
        spreads = _spreads(coordinates["mup"], step)
        assert all(1 / 1.3 < s < 1.3 for s in spreads.values()), (step, spreads)
    sp = _spreads(coordinates["sp"], 3)
    assert max(sp.values()) > 2.0, sp


@pytest.mark.slow
@pytest.mark.parametrize("name", list(OPTIONS))
def test_coordinates_stay_flat_under_mup_with_each_option_alone(name):
    """Each option on its own (slow: the default suite checks the four together)."""
    tokens_BxT1 = jax.random.randint(jax.random.key(0), (4, 33), 0, VOCAB)
    model_cfg = ModelConfig(depth=1, head_dim=H, embed_std=0.1, **OPTIONS[name])
    optim = AdamWConfig(lr=1e-2, schedule="constant", warmup_steps=0, clip_norm=0.0)
    stats = {param: coordinate_check(model_cfg, ParamConfig(param, base_width=64, base_depth=1),
                                     optim, [64, 512], 3,
                                     (tokens_BxT1[:, :-1], tokens_BxT1[:, 1:]))
             for param in ("mup", "sp")}
    test_coordinates_stay_flat_under_mup_with_every_option(stats)


def test_parametrization_groups_the_finite_gains_apart():
    """QK-norm's gains grow with nothing (the head dim is fixed): their own group, whose
    multipliers are the base's, apart from the width-sized block gains."""
    cfg = ModelConfig(width=4 * D, depth=L, head_dim=H, qk_norm=True)
    parametrization = make_parametrization(cfg, ParamConfig("mup", base_width=D, base_depth=L),
                                           VOCAB)
    mults = parametrization.optimizer_multipliers(SGDConfig())
    assert mults["vector.block.finite"].lr == 1.0 and mults["vector.block"].lr == 4.0
    assert dataclasses.asdict(mults["vector.block.finite"]) != dataclasses.asdict(
        mults["vector.block"])
