"""Sharded training on 8 simulated CPU devices (tests/conftest.py): a sharded step is the
single-device step up to float reassociation, for every optimizer family; parameters and
optimizer state are laid out as the config says; checkpoints move between meshes."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import QUICK_JOB, SIMULATED_DEVICES, TINY_RUN
from flax import nnx
from jax.sharding import PartitionSpec as P

from experiments.compose import compose, to_run_config
from optim import learning_rate
from scaling.config import ConfigError, MeshConfig, ShardingRules
from scaling.parametrization import build_model
from scaling.sharding import Layout, layout_of, mesh_shape, place
from scaling.steps import make_step
from scaling.training import data
from scaling.training.checkpoint import Checkpointer
from scaling.training.loop import _Member, _start_line, model_on_mesh

MESH_4x2 = ("mesh.fsdp=4", "mesh.tensor=2")
STEPS = 2


# one block of width 64: every code path of a deeper model, at half its compile time
SMALL = (*TINY_RUN, "model.depth=1", "train.batch_size=8", "train.seq_len=16")


def _config(optim: str, mesh: tuple[str, ...]):
    return to_run_config(compose([*SMALL, f"optim={optim}", *mesh]))


@functools.cache  # shared by the tests that read the same state (none writes into it)
def _trained(optim: str, mesh: tuple[str, ...], steps: int = STEPS):
    """(state after `steps` steps, layout) of the tiny Transformer under `optim` on `mesh`."""
    cfg = _config(optim, mesh)
    run = model_on_mesh(cfg, 256)
    layout, specs = run.layout, run.parametrization.specs
    kwargs = {"total_steps": cfg.train.steps, "seed": cfg.train.seed,
              "grad_accum": cfg.train.grad_accum}
    state = make_step(cfg.optim, run.parametrization, run.graphdef, **kwargs).init_state(
        run.params, cfg.optim.lr)
    shardings = None if layout is None else layout.state(state, specs)
    step = make_step(cfg.optim, run.parametrization, run.graphdef, shardings=shardings,
                     stack=None if layout is None else layout.stack, **kwargs)
    if layout is not None:
        state = place(state, shardings)
    tokens = np.random.default_rng(0).integers(0, 256, 4096).astype(np.uint16)
    for i in range(steps):
        batch = data.train_batch(tokens, 0, i, cfg.train.batch_size, cfg.train.seq_len)
        state, _ = step(state, *(batch if layout is None
                                 else place(batch, (layout.batch,) * 2)))
    return state, layout


# float reassociation of a sharded step: sums split over devices and added in another order
ATOL, RTOL = 2e-6, 2e-5
# MeZO's projected gradient g is a loss difference over 2ε: its float error is the loss's
# (float32, ~1e-6 at a loss of 5.5) over 2ε = 2e-3, about 5e-4; 5e-3 leaves room, and a probe
# drawn differently moves g by O(g) ≈ 0.3
G_ATOL = 5e-3
# the largest |z| of a unit normal probe over the 16384 entries of the largest matrix is about
# 4.3 (P(|z| > 6) per entry is 2e-9)
Z_MAX = 6.0


def _mezo_update_atol(optim: str) -> float:
    """How far MeZO's parameters may move apart through g's float error alone: each step moves
    θ by lr·g·z, so an error of G_ATOL in g moves it by at most lr·G_ATOL·Z_MAX."""
    cfg = _config(optim, ())
    lr_at = learning_rate(cfg.optim, cfg.train.steps)
    return ATOL + sum(float(lr_at(i)) for i in range(STEPS)) * G_ATOL * Z_MAX


# Muon's stacked orthogonalization on the mesh is also MuonH's (its direction), and
# test_muon_stack_keeps_each_matrix_on_one_device checks its update against the unsharded one:
# plain Muon's own two steps run under `-m slow` (13 s of compiles)
@pytest.mark.parametrize("optim", ["adamw", pytest.param("muon", marks=pytest.mark.slow),
                                   "muonh", "mezo"])
def test_sharded_step_equals_single_device_step(optim):
    """Two steps on a 4×2 (fsdp × tensor) mesh against one device: the same parameters and
    optimizer state to float reassociation (a wrong all-reduce, a sphere norm taken per shard
    or a probe drawn per device would be off by O(1)). For MeZO first g, within its own float
    error (G_ATOL), then the parameters, within what that error moves them by."""
    single, _ = _trained(optim, ())
    sharded, layout = _trained(optim, MESH_4x2)
    assert dict(layout.mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    initial, _ = _trained(optim, (), steps=0)
    moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                zip(jax.tree.leaves(single.params), jax.tree.leaves(initial.params),
                    strict=True))
    assert moved > 1e-4  # the steps did move the parameters
    atol = {"params": ATOL, "opt_state": ATOL}
    if optim == "mezo":
        np.testing.assert_allclose(np.asarray(sharded.opt_state.g),
                                   np.asarray(single.opt_state.g), rtol=0, atol=G_ATOL)
        atol["params"] = _mezo_update_atol(optim)
    _assert_states_close(sharded, single, atol)


def _assert_states_close(got, expected, atol: dict[str, float]) -> None:
    for name in ("params", "opt_state"):
        flat = jax.tree_util.tree_flatten_with_path(getattr(expected, name))[0]
        for (path, b), a in zip(flat, jax.tree.leaves(getattr(got, name)), strict=True):
            tolerance = G_ATOL if jax.tree_util.keystr(path).endswith(".g") else atol[name]
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=RTOL, atol=tolerance,
                                       err_msg=jax.tree_util.keystr(path))


def test_accumulated_sharded_step_equals_single_device_step():
    """train.grad_accum=2 on the 4×2 mesh (each micro-batch still split over the 4 fsdp
    devices) takes the single-device whole-batch steps, to float reassociation."""
    single, _ = _trained("adamw", ())
    accumulated, _ = _trained("adamw", (*MESH_4x2, "train.grad_accum=2"))
    _assert_states_close(accumulated, single, {"params": ATOL, "opt_state": ATOL})


def test_parameters_and_optimizer_state_are_sharded_as_configured():
    """Muon on 4×2: each matrix split by its logical axes (embed → fsdp, heads and mlp →
    tensor), the momentum and Adam moments like their parameters, scalars replicated; every
    device holds 1/8 of a block matrix."""
    state, layout = _trained("muon", MESH_4x2)
    params, opt_state = state.params, state.opt_state
    assert params["blocks"]["wq"].sharding.spec == P(None, "fsdp", "tensor")
    assert params["blocks"]["wo"].sharding.spec == P(None, "tensor", "fsdp")
    assert params["blocks"]["w_up"].sharding.spec == P(None, "fsdp", "tensor")
    assert params["embed"].sharding.spec == P("tensor", "fsdp")
    assert params["blocks"]["attn_norm"].sharding.spec == P(None, "fsdp")
    shard = params["blocks"]["wq"].addressable_shards[0].data
    assert shard.shape == (1, 64 // 4, 64 // 2)
    specs = {tuple(str(k) for k in path): leaf.sharding.spec
             for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]}
    momentum = [spec for path, spec in specs.items() if path[-2:] == ("['blocks']", "['wq']")]
    assert momentum and all(spec == P(None, "fsdp", "tensor") for spec in momentum)
    moments = [spec for path, spec in specs.items() if path[-1] == "['embed']"]
    assert len(moments) >= 2 and all(spec == P("tensor", "fsdp") for spec in moments)
    assert state.lr.sharding.spec == P()
    assert state.lr.sharding.mesh.shape == layout.mesh.shape


def test_parameters_are_created_where_the_mesh_keeps_them():
    """model_on_mesh initializes the parameters in one compiled program whose outputs are laid
    out by the mesh, each device creating only its own shards, with the very values a run
    without a mesh starts from (JAX's partitionable random numbers)."""
    sharded, single = model_on_mesh(_config("adamw", MESH_4x2), 256), model_on_mesh(
        _config("adamw", ()), 256)
    wq = sharded.params["blocks"]["wq"]
    assert wq.sharding.spec == P(None, "fsdp", "tensor")
    assert wq.addressable_shards[0].data.shape == (1, 64 // 4, 64 // 2)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 sharded.params, single.params)


def test_layout_rules_keep_an_axis_whole_when_it_cannot_split():
    mesh = jax.make_mesh((2, 4, 1), ("data", "fsdp", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    layout = Layout(mesh, ShardingRules(vocab="fsdp"))
    assert layout.spec(("vocab", "embed"), (256, 64)) == P("fsdp", None)  # fsdp used once
    assert layout.spec(("embed", "mlp"), (6, 64)) == P(None, None)  # 4 does not divide 6
    assert layout.spec(("layers", "embed"), (3, 64)) == P(None, "fsdp")
    with pytest.raises(ValueError, match="logical axis 'experts' has no sharding rule"):
        layout.spec(("experts",), (8,))
    with pytest.raises(ConfigError, match="train.batch_size=4: expected a multiple of 8"):
        layout.check_batch(4)


def test_mesh_shape_resolves_and_refuses():
    assert mesh_shape(MeshConfig(fsdp=-1), 8) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert mesh_shape(MeshConfig(data=2, fsdp=-1, tensor=2), 8)["fsdp"] == 2
    with pytest.raises(ConfigError, match=r"mesh.fsdp=-1: expected the 8 devices to divide by "
                                          r"the other axes' 3"):
        mesh_shape(MeshConfig(fsdp=-1, tensor=3), 8)
    with pytest.raises(ConfigError, match="product is the 8 devices"):
        mesh_shape(MeshConfig(fsdp=2, tensor=2), 8)


@pytest.mark.parametrize("override, field", [
    ("mesh.fsdp=0", "mesh.fsdp=0"), ("mesh.rules.embed=model", "mesh.rules.embed='model'"),
    ("mesh.distributed=maybe", "mesh.distributed='maybe'"),
    ("mesh.data=-1", "mesh={'data': -1, 'fsdp': -1"),
])
def test_bad_mesh_fields_are_named(override, field):
    with pytest.raises(ConfigError) as error:
        to_run_config(compose([override, "mesh=fsdp"]))
    assert str(error.value).startswith(field)


def test_checkpoint_moves_between_meshes(tmp_path):
    """A state saved on a 4×2 mesh restores on 8×1 and on one device, value for value, each
    laid out as its template asks."""
    state, _ = _trained("muon", MESH_4x2)
    assert state.params["blocks"]["wq"].sharding.spec == P(None, "fsdp", "tensor")
    checkpointer = Checkpointer(tmp_path / "checkpoints")
    checkpointer.save(STEPS, state.as_dict(), {"wall_seconds": 1.0})
    checkpointer.close()
    cfg = _config("muon", ())
    _, parametrization = build_model(cfg.model, cfg.param, 256, 0)
    expected = jax.device_get(state.as_dict())
    other = Layout(jax.make_mesh((8, 1, 1), ("data", "fsdp", "tensor"),
                                 axis_types=(jax.sharding.AxisType.Auto,) * 3),
                   ShardingRules(embed="data"))
    templates = {"8x1": place(expected, other.state(expected, parametrization.specs)),
                 "one device": jax.device_put(expected, jax.devices()[0])}
    for where, template in templates.items():
        step, restored, meta = Checkpointer(tmp_path / "checkpoints").restore_latest(template)
        assert step == STEPS and meta == {"wall_seconds": 1.0}, where
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b),
                     restored, expected)
        for a, t in zip(jax.tree.leaves(restored), jax.tree.leaves(template), strict=True):
            assert a.sharding == t.sharding, where
    wq = templates["8x1"]["params"]["blocks"]["wq"]
    assert wq.sharding.spec == P(None, "data", None)


def test_scaling_train_mesh_fsdp_with_an_lr_grid(tmp_path):
    """`scaling-train mesh=fsdp` over the 8 devices, two LRs trained together: each writes its
    result with the layout it trained on, under the name the unsharded run has (the mesh is
    where a run trains, not what it trains), and learns."""
    from synthetic import call_main

    from experiments.train import main
    from scaling.training.loop import member_config, sweep_lrs
    from scaling.training.rundir import run_name

    out = tmp_path / "runs"
    grid = ["sweep.log2_lr_min=-7", "sweep.log2_lr_max=-6", "sweep.log2_lr_step=1",
            "sweep.vectorize_lr=2", "train.batch_size=8"]
    code, _ = call_main(main, [*QUICK_JOB, *grid, "mesh=fsdp", f"train.out_dir={out}"])
    assert code == 0
    results = {json.loads(p.read_text())["name"]: json.loads(p.read_text())
               for p in out.glob("*/result.json")}
    unsharded = to_run_config(compose([*QUICK_JOB, *grid, f"train.out_dir={out}"]))
    assert sorted(results) == sorted(run_name(member_config(unsharded, lr))
                                     for lr in sweep_lrs(unsharded))
    for result in results.values():
        assert result["sharding"]["mesh"] == {"data": 1, "fsdp": SIMULATED_DEVICES, "tensor": 1}
        assert result["sharding"]["params"]["blocks/w_up"] == [None, "fsdp", None]
        assert result["config"]["mesh"]["fsdp"] == -1
        assert result["lrs_trained_together"] == 2 and result["val_loss"] < 5.0


def test_start_line_names_the_mesh(tmp_path):
    """What a run prints as it starts on a mesh: its axes, devices and processes."""
    cfg = _config("adamw", (*MESH_4x2, "train.grad_accum=2"))
    member = _Member(cfg, tmp_path)
    assert _start_line([member, member], 0, layout_of(cfg.mesh)) == (
        f"{member.name} (+1 LRs): starting, 12 steps, batches of 8×16 tokens in 2 "
        "micro-batches, on mesh fsdp=4 tensor=2 (8 cpu devices, 1 process)")


def test_muon_stack_keeps_each_matrix_on_one_device():
    """Four 32×48 momenta sharded by rows over 8 devices: with the stack, every dot of the
    compiled Newton–Schulz loop is one whole matrix (32×48 or its 32×32 Gram); left to the
    compiler, the same loop multiplies row slices (4 of 32 rows) and all-reduces them. Both
    give the unsharded update."""
    from optim.muon import scale_by_muon
    from optim.stack import StackSharding
    from optim.trees import MatrixAxes

    mesh = jax.make_mesh((1, 8, 1), ("data", "fsdp", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    grads = {"w": jax.random.normal(jax.random.key(0), (4, 32, 48))}
    axes = {"w": MatrixAxes((-2,), (-1,))}
    sharded = jax.device_put(grads, {"w": jax.sharding.NamedSharding(mesh, P(None, "fsdp"))})
    unsharded = scale_by_muon(axes)
    expected = np.asarray(unsharded.update(grads, unsharded.init(grads))[0]["w"])
    dots = {}
    for name, stack in (("stack", StackSharding(mesh, ("fsdp",))), ("compiler", None)):
        tx = scale_by_muon(axes, stack=stack)
        update = jax.jit(lambda g, tx=tx: tx.update(g, tx.init(g))[0])
        np.testing.assert_allclose(np.asarray(update(sharded)["w"]), expected, rtol=1e-4,
                                   atol=1e-5)
        hlo = update.lower(sharded).compile().as_text()
        dots[name] = {line.split("=")[1].split()[0] for line in hlo.splitlines() if " dot(" in line}
    assert dots["stack"] == {"f32[32,48]{1,0}", "f32[32,32]{1,0}"}
    assert any(shape.startswith("f32[4,4,") for shape in dots["compiler"])


def test_fsdp_forward_gathers_weights_and_keeps_activations_split():
    """FSDP as meant: the forward all-gathers each weight and keeps the residual stream split
    over the batch, with no all-reduce of activations. Without the model's activation
    sharding the compiler lets the stream follow the embedding table's width split (measured
    at depth 2: 10 all-reduces, the logits replicated, the train step 1.67× slower;
    docs/sharding.md)."""
    layout = layout_of(MeshConfig(fsdp=-1))
    counts = {}
    for constrained in (False, True):
        cfg = _config("adamw", ())
        model, parametrization = build_model(
            cfg.model, cfg.param, 256, 0,
            activation_sharding=layout.activations if constrained else None)
        graphdef, params = nnx.split(model)
        params = params.to_pure_dict()
        params = place(params, layout.state(params, parametrization.specs))
        tokens = place(np.zeros((8, 32), np.int32), layout.batch)
        forward = jax.jit(lambda p, t, g=graphdef: nnx.merge(g, p).forward(t)[0])
        hlo = forward.lower(params, tokens).compile().as_text()
        counts[constrained] = ([" all-reduce(" in line for line in hlo.splitlines()].count(True),
                               forward(params, tokens).sharding.spec)
    assert counts[True] == (0, P("fsdp"))
    assert counts[False][0] > 0  # what the constraint prevents


def test_single_mesh_is_no_mesh():
    """mesh=single compiles exactly the unsharded program; any -1 makes a mesh, even of one."""
    assert layout_of(MeshConfig()) is None
    assert dict(layout_of(MeshConfig(fsdp=-1)).mesh.shape)["fsdp"] == SIMULATED_DEVICES


def test_a_mesh_batch_is_the_whole_batch_read_one_shard_at_a_time(monkeypatch):
    """On the 4×2 mesh the global batch equals the one-device batch, and it is read a shard of
    rows at a time (the batch split over data × fsdp = 4): never whole, so each process of a
    multi-host run reads only the rows its devices hold (tests/test_distributed.py runs two)."""
    layout = layout_of(MeshConfig(fsdp=4, tensor=2))
    tokens = np.random.default_rng(0).integers(0, 256, 4096).astype(np.uint16)
    whole = data.train_batch(tokens, 3, 7, 8, 16)
    assert np.array_equal(data.train_batch(tokens, 3, 7, 8, 16, rows=slice(2, 4))[1],
                          whole[1][2:4])
    reads, draw = [], data.train_batch

    def recording(*args, rows=slice(None)):
        reads.append(list(range(8))[rows])
        return draw(*args, rows=rows)

    monkeypatch.setattr(data, "train_batch", recording)
    inputs, targets = data.global_batch(tokens, 3, 7, 8, 16, layout.batch)
    assert inputs.sharding == targets.sharding == layout.batch
    np.testing.assert_array_equal(np.asarray(inputs), whole[0])
    np.testing.assert_array_equal(np.asarray(targets), whole[1])
    assert sorted(reads) == [[0, 1], [2, 3], [4, 5], [6, 7]]  # once per shard, not per device
