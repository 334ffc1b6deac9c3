"""Any Flax NNX model: roles inferred from a base and a delta copy (scaling/inference.py), the
forward-multiplier helpers, the Python path (scaling.any_model) and the command line
(`model.factory=...`), on the examples of docs/examples/."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
import optim
from models.config import ModelConfig
from models.multipliers import AttentionScale, BranchMultiplier
from models.tagged import UNIT_DRAW, annotate, iter_params, param_specs
from scaling import any_model, coord_check_any
from scaling.any_model import infer_parametrization, make_train_step, parametrize
from scaling.config import ParamConfig
from scaling.coord_check import failures
from scaling.inference import InferenceError
from scaling.parametrization import make_parametrization
from scaling.schemes import SCHEMES

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "docs" / "examples"))
import cnn
import mlp_teacher
import run_example
import vit


def _roles(parametrization):
    return {"/".join(map(str, p)): (s.role, s.fan_in_axes, s.fan_out_axes, s.init)
            for p, s in parametrization.specs.items()}


def test_layer_types_give_roles_fan_axes_and_inits():
    roles = _roles(infer_parametrization(vit.ViT, width=64, base_width=32))
    assert roles["patch/kernel"] == ("input", (-4, -3, -2), (-1,), "normal")  # receptive field
    assert roles["position"][0] == "input"
    assert roles["blocks/0/attn/query/kernel"] == ("hidden", (-3,), (-2, -1), "normal")
    assert roles["blocks/0/attn/out/kernel"] == ("hidden", (-3, -2), (-1,), "normal")
    assert roles["blocks/0/attn/query/bias"] == ("vector", (), (-2,), "zero")  # heads grow
    assert roles["blocks/0/norm1/scale"] == ("vector", (), (-1,), "one")
    assert roles["blocks/0/up/kernel"] == ("hidden", (-2,), (-1,), "normal")
    assert roles["head/kernel"] == ("output", (-2,), (-1,), "normal")
    assert roles["head/bias"] == ("vector", (), (), "zero")  # nothing grows: a finite vector


def test_dense_first_layer_gets_fan_in_init_and_embedding_unit_init():
    p = infer_parametrization(mlp_teacher.MLP, width=256, base_width=64, scheme="mup")
    assert p.init_std(("inp", "kernel")) == pytest.approx(mlp_teacher.D_IN**-0.5)
    assert p.init_std(("hidden", 0, "kernel")) == pytest.approx(256**-0.5)
    assert p.init_std(("out", "kernel")) == pytest.approx(64**-0.5)  # μP: the base's std
    assert p.logit_multiplier == pytest.approx(0.25)
    lm = infer_parametrization(lambda w: models.create(
        ModelConfig(factory="user_lm:make_lm", width=w, depth=1), 256), width=64, base_width=32)
    assert lm.init_std(("net", "embed", "embedding")) == 1.0


def test_einsum_and_stacked_layers():
    class Stacked(nnx.Module):
        def __init__(self, width):
            rngs = nnx.Rngs(0)
            self.mix = nnx.Einsum("btd,dh->bth", (width, 2 * width), rngs=rngs)

            @nnx.vmap(in_axes=0, out_axes=0)
            def layers(key):
                return nnx.Linear(2 * width, 2 * width, rngs=nnx.Rngs(key))
            self.layers = layers(jax.random.split(jax.random.key(0), 3))

    p = infer_parametrization(Stacked, width=64, base_width=32)
    layer = p.specs[("layers", "kernel")]
    assert (layer.shape, layer.role, layer.fan_in_axes) == ((3, 128, 128), "hidden", (-2,))
    assert layer.logical_axes == ("layers", "embed", "mlp")
    assert p.specs[("layers", "bias")].logical_axes == ("layers", "embed")
    assert p.specs[("mix", "kernel")].role == "hidden"


def test_explicit_metadata_wins_and_an_unknown_parameter_is_an_error():
    class Custom(nnx.Module):
        def __init__(self, width, tag=True):
            self.w = nnx.Param(jnp.zeros((width, width)))
            if tag:
                annotate(self.w, role="output", fan_in_axes=(-2,), fan_out_axes=(-1,))

    spec = infer_parametrization(Custom, width=64, base_width=32).specs[("w",)]
    assert spec.role == "output" and spec.redraw  # annotated: its own draw, drawn afresh
    with pytest.raises(InferenceError, match=r"parameter w \(64, 64\): not a parameter of a "
                                             r"known layer.*annotate it"):
        infer_parametrization(lambda w: Custom(w, tag=False), width=64, base_width=32)
    with pytest.raises(ValueError, match="role='bad'"):
        annotate(nnx.Param(jnp.zeros(3)), role="bad")


def test_a_matrix_with_no_growing_axis_is_an_error():
    fixed = lambda w: nnx.Linear(4, 4, rngs=nnx.Rngs(0))
    with pytest.raises(InferenceError, match="no fan axis grows with width"):
        infer_parametrization(fixed, width=64, base_width=32)


def test_the_transformer_inferred_equals_its_tags():
    """Roles stripped, fan axes kept: inference gives every tagged role, and the same init
    stds, LR/ε/WD multipliers and forward multipliers under every scheme."""
    cfg = ModelConfig(width=128, depth=2, head_dim=32, qk_norm=True)

    def stripped(width, depth):
        model = models.create(dataclasses.replace(cfg, width=width, depth=depth), 256)
        for _, param in iter_params(model):
            for key in ("role", "logical_axes", UNIT_DRAW):
                param.del_metadata(key)
        return model

    tagged_specs = param_specs(nnx.eval_shape(lambda: models.create(cfg, 256)))
    for name in SCHEMES:
        tagged = make_parametrization(cfg, ParamConfig(name=name, base_width=64), 256)
        inferred = infer_parametrization(stripped, scheme=name, width=128, base_width=64,
                                         depth=2, base_depth=ParamConfig().base_depth)
        assert {p: s.role for p, s in inferred.specs.items()} == {
            p: s.role for p, s in tagged_specs.items()}
        for path in tagged.specs:
            assert inferred.init_std(path) == pytest.approx(tagged.init_std(path))
        for cfg_opt in (optim.AdamWConfig(), optim.MuonConfig(), optim.SGDConfig()):
            assert inferred.optimizer_multipliers(cfg_opt) == tagged.optimizer_multipliers(
                cfg_opt)
        assert inferred.logit_multiplier == tagged.logit_multiplier


def test_forward_multipliers_are_set_and_depth_rules_need_branches():
    model, p = parametrize(vit.ViT, scheme="completep", width=64, base_width=32, depth=4,
                           base_depth=2)
    branch = [m for _, m in nnx.iter_graph(model) if isinstance(m, BranchMultiplier)]
    assert branch and all(m.value == pytest.approx(0.5) for m in branch)  # (4/2)^-1
    # μP's 1/m (m = 2), CompleteP's (L/L0)^(α−1) = 1 on Adam's block LR
    assert p.optimizer_multipliers(optim.AdamWConfig())["hidden.block"].lr == pytest.approx(0.5)
    scale = [m for _, m in nnx.iter_graph(model) if isinstance(m, AttentionScale)]
    assert scale[0].value == pytest.approx(vit.HEAD_DIM**-0.5)  # head dim fixed: SP's value
    assert model.readout.value == pytest.approx(0.5)
    with pytest.raises(ValueError, match="BranchMultiplier"):
        parametrize(lambda w, d: mlp_teacher.MLP(w, d), scheme="completep", width=64,
                    base_width=32, depth=4, base_depth=2)


# MeZO: SGD's LR scale (an estimate of the gradient along 8 probes, 60 steps to show it)
FAMILY_SETTINGS = {"mezo": {"lr": 0.05, "n_probes": 8}, "sgd": {"lr": 0.1}}


@pytest.mark.parametrize("family", sorted(optim.OPTIMIZERS))
def test_every_family_trains_a_user_model(family):
    cfg = optim.OPTIMIZERS[family](**{"lr": 0.01, "warmup_steps": 0,
                                      **FAMILY_SETTINGS.get(family, {})})
    model, p = parametrize(mlp_teacher.MLP, scheme="mup", width=64, base_width=32)
    graphdef, state = nnx.split(model)
    params = state.to_pure_dict()
    steps = 60 if family == "mezo" else 20
    tx = any_model.build_optimizer(cfg, p, total_steps=steps)
    step = make_train_step(graphdef, tx, mlp_teacher.loss_fn, gradient=cfg.needs_gradient)
    opt_state = tx.init(params)
    x, y = mlp_teacher.data(64)
    losses = []
    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state, x, y)
        losses.append(float(loss))
    assert losses[-1] < 0.9 * losses[0]


def test_mezo_through_optax_refuses_what_only_its_step_does():
    _, p = parametrize(mlp_teacher.MLP, scheme="mup", width=64, base_width=32)
    with pytest.raises(ValueError, match=r"optim.sparsity=0.8: expected 0.0"):
        any_model.build_optimizer(optim.MeZOConfig(sparsity=0.8), p, total_steps=10)


def _check(module, make, widths, base, lr=0.003):
    stats = coord_check_any.coordinate_check(
        make, module.loss_fn, module.data(32), optim.AdamWConfig(lr=lr, warmup_steps=0),
        widths=widths, base_width=base, steps=2, seeds=2)
    return stats, coord_check_any.rows(stats)


@pytest.mark.parametrize("example", ["mlp", "cnn", "vit"])
def test_examples_coordinate_check_passes_under_mup_and_fails_under_sp(example):
    module, make, widths, lr = {"mlp": (mlp_teacher, mlp_teacher.MLP, (64, 512), 0.01),
                                "cnn": (cnn, cnn.CNN, (32, 256), 0.003),
                                "vit": (vit, vit.ViT, (32, 128), 0.003)}[example]
    stats, rows = _check(module, make, widths, widths[0], lr)
    assert not failures(rows, 0.125), failures(rows, 0.125)
    sp = [r for r in rows if r.param == "sp" and r.covered and r.step >= 1]
    assert max(abs(r.slope) for r in sp) > 0.125  # SP fails the check μP passes
    assert not coord_check_any.readout_warnings(stats)


def test_a_missing_readout_multiplier_is_measured():
    class NoMultiplier(mlp_teacher.MLP):
        def __call__(self, x):
            h = jax.nn.relu(self.inp(x))
            for layer in self.hidden:
                h = jax.nn.relu(layer(h))
            return self.out(h)

    stats, _ = _check(mlp_teacher, NoMultiplier, (64, 512), 64, lr=0.01)
    (warning,) = coord_check_any.readout_warnings(stats)
    assert warning.startswith("mup:") and "ReadoutMultiplier" in warning


def test_factory_model_trains_from_the_command_line_sharded_by_inferred_axes(tmp_path):
    """`model.factory=` under μP + Muon on the 8 simulated devices (mesh=fsdp): the inferred
    logical axes place each matrix, a growing fan-in split over fsdp."""
    import experiments.train

    experiments.train.main([
        "model.factory=user_lm:make_lm", "model.width=64", "model.depth=2",
        "param.base_width=32", "param=mup", "optim=muon", "train.steps=6", "mesh=fsdp",
        "train.batch_size=8", "train.seq_len=16", "optim.warmup_steps=1",
        "train.eval_every=6", "train.eval_batches=1", "logging.wandb_mode=disabled",
        "logging.progress=false", f"train.out_dir={tmp_path}"])
    (run,) = tmp_path.iterdir()
    assert run.name.startswith("make_lm-w64-d2-mup-muon")
    result = json.loads((run / "result.json").read_text())
    assert result["sharding"]["params"]["net/blocks/0/up/kernel"] == ["fsdp", None]
    assert result["sharding"]["params"]["net/head/kernel"] == ["fsdp", None]
    assert np.isfinite(result["val_loss"]) and result["val_loss"] < 6.0


def test_bad_factory_is_a_one_line_error(capsys, tmp_path, monkeypatch):
    from synthetic import assert_one_line_cli_error

    import experiments.train

    monkeypatch.chdir(tmp_path)
    assert_one_line_cli_error(experiments.train.main, ["model.factory=no_such_module:f"],
                              capsys, "scaling-train", ["model.factory", "no_such_module"],
                              tmp_path)
    assert_one_line_cli_error(experiments.train.main, ["model.factory=user_lm:make_lm",
                                                       "optim=mezo"],
                              capsys, "scaling-train", ["optim.name", "mezo", "model.factory"],
                              tmp_path)


def test_inferred_axes_shard_on_a_mesh():
    from jax.sharding import Mesh

    from scaling.config import ShardingRules
    from scaling.sharding import Layout

    p = infer_parametrization(mlp_teacher.MLP, width=64, base_width=32)
    mesh = Mesh(np.array(jax.devices()[:1] * 1).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    layout = Layout(mesh, ShardingRules())
    for spec in p.specs.values():
        layout.spec(spec.logical_axes, spec.shape)  # every inferred name has a rule
    assert p.specs[("hidden", 0, "kernel")].logical_axes == ("embed", "mlp")


def test_scaling_coord_check_on_a_factory_model(tmp_path, restore_root_logging):
    """`scaling-coord-check model.factory=...` (AdamW 0.01, zero readout, 2 steps, 2 inits,
    widths 64 and 256): every module output of the user's LM is flat under μP (the check
    passes) and SP's logits grow (measured 1.75 per doubling)."""
    from synthetic import call_main

    import experiments.coord_check

    code, out = call_main(experiments.coord_check.main, [
        "model.factory=user_lm:make_lm", "model.depth=2", "param.base_width=64",
        "coord.widths=[64,256]", "coord.seeds=2", "coord.steps=2", "coord.check=true",
        f"coord.out_dir={tmp_path}", "logging.wandb_mode=disabled", "optim=adamw",
        "optim.lr=0.01", "optim.warmup_steps=0", "optim.schedule=constant"])
    assert code == 0, out
    assert "warning" not in out
    assert "width mup (checked): flat" in out and "width sp (not required flat): not flat" in out
    (check,) = tmp_path.iterdir()
    assert check.name.startswith("coord-make_lm-")
    assert "blocks.1.down" in (check / "slopes.md").read_text()  # the user's modules, by path


def test_scaling_coord_check_warns_of_a_forgotten_readout_multiplier(tmp_path,
                                                                     restore_root_logging):
    from synthetic import call_main

    import experiments.coord_check

    code, out = call_main(experiments.coord_check.main, [
        "model.factory=user_lm:make_unscaled_lm", "model.depth=1", "param.base_width=64",
        "coord.widths=[64,256]", "coord.seeds=1", "coord.steps=1", "coord.params=[mup]",
        f"coord.out_dir={tmp_path}", "logging.wandb_mode=disabled", "optim=adamw",
        "optim.lr=0.01", "optim.warmup_steps=0", "optim.schedule=constant"])
    assert code == 0
    (line,) = [x for x in out.splitlines() if "warning" in x]
    assert line.startswith("scaling-coord-check: warning: mup:") and "ReadoutMultiplier" in line


@pytest.mark.parametrize("layer, expected", [
    (lambda w: nnx.ConvTranspose(3, w, kernel_size=(2, 2), rngs=nnx.Rngs(0)),
     {"kernel": ("input", (-4, -3, -2), (-1,), "normal"), "bias": ("vector", (), (-1,), "zero")}),
    (lambda w: nnx.GroupNorm(w, num_groups=4, rngs=nnx.Rngs(0)),
     {"scale": ("vector", (), (-1,), "one"), "bias": ("vector", (), (-1,), "zero")}),
    (lambda w: nnx.BatchNorm(w, rngs=nnx.Rngs(0)),
     {"scale": ("vector", (), (-1,), "one"), "bias": ("vector", (), (-1,), "zero")}),
])
def test_more_layer_types(layer, expected):
    assert _roles(infer_parametrization(layer, width=64, base_width=32)) == expected


def test_attention_scale_is_the_default_under_sp_and_one_over_d_under_mup():
    def attention(width, fn=None):
        extra = {} if fn is None else {"attention_fn": fn}
        return nnx.MultiHeadAttention(num_heads=2, in_features=width, decode=False,
                                      rngs=nnx.Rngs(0), **extra)

    x = jax.random.normal(jax.random.key(1), (2, 5, 64))
    plain, scaled = attention(64), attention(64, AttentionScale(32))
    np.testing.assert_allclose(scaled(x), plain(x), rtol=1e-5, atol=1e-6)  # 1/√32 both
    # heads fixed, head dim grows with width: μP's 1/d, from the base's 1/√d0
    _, p = parametrize(lambda w: attention(w, AttentionScale(w // 2)), scheme="mup",
                       width=256, base_width=64)
    assert p.attention_scale == pytest.approx(32**-0.5 * (128 / 32) ** -1)


@pytest.mark.parametrize("example, steps, lr", [(mlp_teacher, 60, 2**-4), (cnn, 60, 2**-4),
                                               (vit, 200, 2**-6)],  # the ViT plateaus first
                         ids=["mlp", "cnn", "vit"])
def test_examples_train_under_mup_and_muon_in_their_dozen_lines(example, steps, lr):
    losses = run_example.train(example, width=64, base_width=32, steps=steps, lr=lr)
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10])


def test_analysis_names_a_factory_model_by_its_function():
    from synthetic import run_result

    from scaling.analysis import analyze

    results = [run_result("mup", width, x, 0, 0.05 * (x + 8) ** 2 + 2,
                          extra={"model": {"factory": "user_lm:make_lm"}})
               for width in (64, 128) for x in (-10, -9, -8, -7, -6)]
    (drift,) = analyze(results)["drift"]
    assert drift["family"]["kind"] == "make_lm"
