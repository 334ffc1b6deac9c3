"""Pallas Newton–Schulz kernels (optim/kernels): kernel = jnp reference, symmetric Gram = dense
Gram, the upper-tile grid, that a broken tile index or mirror is caught, and that the kernels
lower for TPU (Mosaic) and GPU (Triton) without the hardware.

On CPU the kernels run in the Pallas interpreter: the generic one, and the TPU one (its memory
model, with never-written memory read as NaN) where the test says so.
"""

from __future__ import annotations

import functools
import json
import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from test_orthogonalize import _orthogonality_error, _well_conditioned

import optim.kernels
from experiments.compose import compose, to_run_config
from optim.kernels import pallas_newton_schulz, platforms, symmetric_gram, tiles
from optim.kernels.compat import abstract_device, lowering_platform
from optim.muon import auon_direction
from optim.orthogonalize import newton_schulz, orthogonalize, preset, resolve_backend
from scaling.config import ConfigError
from scaling.training.loop import train

TILE = 16  # interpreter-sized tiles; shapes below are not multiples of it and span ≥ 2 tiles
# Kernel against reference in float32: both accumulate in float32, only the order of the sums
# differs (measured ≤ 2e-6 on entries of size ~0.1). In bfloat16 the operands of every product are
# rounded, so differently ordered float32 sums round to different bfloat16 values: measured
# relative Frobenius gaps ≤ 0.04; a wrong or missing tile gives ≥ 0.3 or NaN.
F32_ATOL = 2e-5
BF16_REL = 0.06
# (kernel, reduce_in_grid): the fused whole-matrix kernel, and the tiled kernels with the
# reduction as a grid axis (the TPU form) or as an in-kernel loop over panels (the GPU form).
FORMS = [("fused", None), ("tiled", True), ("tiled", False)]
# (shape, normalization): square, wide, tall, a stack of 3, a 2 × 3 stack; each form meets both
# normalizations (the fused kernel computes them itself, the tiled path from upper tiles).
CASES = [((40, 40), "frobenius"), ((40, 100), "schatten4"), ((100, 40), "frobenius"),
         ((3, 40, 72), "schatten4"), ((2, 3, 36, 50), "frobenius")]
# Two steps run every distinct kernel call (the first step reuses the normalizing Gram, the
# second forms its own) at 6 interpreted calls instead of 15.
STEPS = 2


def _relative_gap(x: jax.Array, ref: jax.Array) -> float:
    return float(jnp.linalg.norm((x - ref).ravel()) / jnp.linalg.norm(ref.ravel()))


def _input(shape, seed=0):
    *batch, m, n = shape
    return _well_conditioned(jax.random.key(seed), m, n, tuple(batch))


def _traced_ns(g, dtype=None, normalization="frobenius", scheme="polar_express", steps=STEPS,
               **kernel):
    coefficients, safety = preset(scheme, steps)
    opts = {"safety": safety, "compute_dtype": dtype, "normalization": normalization}
    if not kernel:
        return newton_schulz(g, coefficients, **opts)
    return pallas_newton_schulz(g, coefficients, tile=TILE, **opts, **kernel)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _compiled_ns(g, dtype, normalization, scheme, steps, kernel: tuple):
    return _traced_ns(g, dtype, normalization, scheme, steps, **dict(kernel))


def _ns(g, dtype=None, normalization="frobenius", scheme="polar_express", steps=STEPS, **kernel):
    """The reference (no kernel options) or the kernels, as one compiled program per shape and
    options: the cases that share them share it, and it compiles faster than running the map
    op by op. Traced once per signature, so the mutation tests below use _fresh_ns instead."""
    return _compiled_ns(g, dtype, normalization, scheme, steps, tuple(sorted(kernel.items())))


def _fresh_ns(g, **options):
    """_ns traced anew: it sees the tile functions as they are now (monkeypatched or not)."""
    return jax.jit(lambda x: _traced_ns(x, **options))(g)


# ---------------------------------------------------------------------------------------------
# The upper-triangular tile grid


@pytest.mark.parametrize("count", range(1, 10))
def test_upper_tile_grid_visits_each_upper_tile_once(count):
    """p ↦ (row, col) is a bijection from [0, t(t+1)/2) onto {row ≤ col}: no tile skipped or
    repeated, none below the diagonal."""
    p = jnp.arange(tiles.num_upper_tiles(count))
    rows, cols = tiles.upper_tile(p, count)
    visited = sorted(zip(rows.tolist(), cols.tolist(), strict=True))
    assert visited == [(i, j) for i in range(count) for j in range(i, count)]


# ---------------------------------------------------------------------------------------------
# Symmetric Gram = dense Gram


@pytest.mark.parametrize("reduce_in_grid", [True, False])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_symmetric_gram_is_the_dense_gram(reduce_in_grid, dtype):
    """Upper tiles of XXᵀ for a stack of 3 (3 × 5 tiles), mirrored, equal the dense product with
    the same operand dtype; and β·AAᵀ + α·A read from upper storage equals the dense form."""
    x = jax.random.normal(jax.random.key(1), (3, 3 * TILE, 5 * TILE))
    opts = {"tile": TILE, "dtype": dtype, "reduce_in_grid": reduce_in_grid}
    gram = tiles.mirror_upper(symmetric_gram(x, **opts), TILE)
    x_op = x.astype(dtype)
    dense = jnp.einsum("bik,bjk->bij", x_op, x_op, preferred_element_type=jnp.float32)
    tol = 1e-5 if dtype == jnp.float32 else 1e-3
    assert _relative_gap(gram, dense) < tol

    a = dense / jnp.linalg.norm(dense, axis=(-2, -1), keepdims=True)
    poly = tiles.mirror_upper(symmetric_gram(a, symmetric=True, alpha=-1.5, beta=0.5, **opts), TILE)
    a_op = a.astype(dtype)
    expected = -1.5 * a + 0.5 * jnp.einsum("bik,bjk->bij", a_op, a_op,
                                           preferred_element_type=jnp.float32)
    assert _relative_gap(poly, expected) < tol


def test_symmetric_gram_never_reads_below_the_diagonal():
    """A symmetric input whose lower tiles are NaN (as never-written storage may be) gives the
    same finite result: every read below the diagonal goes to the mirrored upper tile."""
    x = jax.random.normal(jax.random.key(2), (2, 3 * TILE, 3 * TILE))
    a = jnp.einsum("bik,bjk->bij", x, x) / x.shape[-1]
    t = jnp.arange(a.shape[-1]) // TILE
    poisoned = jnp.where(t[:, None] > t[None, :], jnp.nan, a)
    for reduce_in_grid in (True, False):
        out = tiles.mirror_upper(symmetric_gram(poisoned, tile=TILE, symmetric=True, alpha=1.0, beta=1.0,
                                     reduce_in_grid=reduce_in_grid), TILE)
        assert bool(jnp.all(jnp.isfinite(out)))
        assert _relative_gap(out, a + a @ a) < 1e-5


def test_tiled_step_computes_only_upper_tiles_of_both_symmetric_products():
    """One tiled step on a 300 × 520 matrix in 64-tiles (t = 5 row tiles, c = 9 column chunks)
    runs t(t+1)/2·c tile products for XXᵀ, t(t+1)/2·t for A² and t·c·t for BX: 435 against
    the direct form's 2t²c + t³ = 575 (3m²n + m³ against 4m²n + 2m³ as the tiles shrink)."""
    coefficients, safety = preset("jordan", 1)
    jaxpr = str(jax.make_jaxpr(functools.partial(
        pallas_newton_schulz, coefficients=coefficients, safety=safety, kernel="tiled",
        tile=64))(jnp.ones((1, 300, 520))))
    grids = [tuple(int(v) for v in g.split(",") if v.strip())
             for g in re.findall(r"GridMapping\(grid=\(([0-9, ]+)\)", jaxpr)]
    t, c, upper = 5, 9, tiles.num_upper_tiles(5)
    assert grids == [(1, upper, c), (1, upper, t), (1, t, c, t)]
    tile_products = sum(math.prod(grid) for grid in grids)
    assert tile_products == upper * c + upper * t + t * c * t == 435
    assert 2 * t * t * c + t**3 == 575


def test_symmetric_gram_rejects_shapes_off_the_tile_grid():
    with pytest.raises(ValueError, match="multiple of tile=16"):
        symmetric_gram(jnp.ones((1, 20, 32)), tile=TILE)


# ---------------------------------------------------------------------------------------------
# Kernel = reference


@pytest.mark.parametrize(("kernel", "reduce_in_grid"), FORMS)
@pytest.mark.parametrize(("shape", "normalization"), CASES)
def test_kernels_match_the_reference_in_float32(kernel, reduce_in_grid, shape, normalization):
    """Sides that are not multiples of the 16-row tile, two or more tiles per axis."""
    g = _input(shape)
    ref = _ns(g, normalization=normalization)
    out = _ns(g, normalization=normalization, kernel=kernel, reduce_in_grid=reduce_in_grid)
    assert out.shape == g.shape and out.dtype == g.dtype
    assert float(jnp.max(jnp.abs(out - ref))) < F32_ATOL


@pytest.mark.parametrize(("kernel", "reduce_in_grid"), FORMS)
@pytest.mark.parametrize("shape", [(40, 100), (100, 40), (3, 40, 72)])
def test_kernels_match_the_reference_in_bfloat16(kernel, reduce_in_grid, shape):
    """bfloat16 operands, float32 accumulation, on both sides; the output keeps the input dtype."""
    g = _input(shape, seed=3).astype(jnp.bfloat16)
    ref = _ns(g, dtype=jnp.bfloat16, normalization="schatten4")
    out = _ns(g, dtype=jnp.bfloat16, normalization="schatten4", kernel=kernel,
              reduce_in_grid=reduce_in_grid)
    assert out.dtype == jnp.bfloat16
    gap = _relative_gap(out.astype(jnp.float32), ref.astype(jnp.float32))
    assert gap < BF16_REL, gap


def test_five_kernel_steps_land_in_the_polar_express_band():
    """The full default map (Polar Express × 5, Schatten-4) through the tiled kernels in bfloat16
    stays inside the band test_orthogonalize holds the reference to."""
    g = _input((2, 40, 100), seed=7)
    out = _ns(g, dtype=jnp.bfloat16, normalization="schatten4", steps=5, kernel="tiled")
    assert _orthogonality_error(out) < 0.16


@pytest.mark.parametrize("kernel", ["fused", "tiled"])
def test_kernels_match_the_reference_in_the_tpu_interpreter(kernel):
    """The TPU interpreter fills never-written memory with NaN: a kernel that read a tile it
    had not written, or a lower tile, would not come out finite and equal."""
    g = _input((3, 40, 72), seed=4)
    ref = _ns(g, scheme="jordan")
    out = _ns(g, scheme="jordan", kernel=kernel, interpret="tpu")
    assert float(jnp.max(jnp.abs(out - ref))) < F32_ATOL


@pytest.mark.parametrize("kernel", ["fused", "tiled"])
def test_kernels_under_vmap_match_the_reference(kernel):
    """A vectorized LR sweep vmaps the optimizer: the kernels batch under jax.vmap too."""
    g = _input((2, 3, 40, 72), seed=10)
    out = jax.vmap(lambda x: _ns(x, kernel=kernel))(g)
    assert float(jnp.max(jnp.abs(out - _ns(g)))) < F32_ATOL


# ---------------------------------------------------------------------------------------------
# Mutations the tolerances catch


def _skip_last_tile(count):
    return count * (count + 1) // 2 - 1


_upper_tile = tiles.upper_tile
MUTATIONS = {
    # a reader takes tile (row, col) straight from storage, below the diagonal too
    "missing mirror": ("stored", lambda row, col: (row, col)),
    # a mirrored tile is read without its transpose
    "untransposed mirror": ("mirrored", lambda tile, row, col: tile),
    # the grid stops one tile short
    "skipped tile": ("num_upper_tiles", _skip_last_tile),
    # the row and column of each upper tile swapped
    "wrong index": ("upper_tile", lambda p, count: _upper_tile(p, count)[::-1]),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_a_broken_tile_index_or_mirror_fails_the_reference_check(mutation, monkeypatch):
    """Each mutation of the tile arithmetic moves the tiled kernel's output far outside the
    float32 tolerance (or makes it non-finite) on the stack the tests above use."""
    g = _input((3, 40, 72), seed=5)
    ref = _ns(g)
    good = _ns(g, kernel="tiled")
    assert float(jnp.max(jnp.abs(good - ref))) < F32_ATOL
    name, replacement = MUTATIONS[mutation]
    monkeypatch.setattr(tiles, name, replacement)
    broken = _fresh_ns(g, kernel="tiled")
    finite = bool(jnp.all(jnp.isfinite(broken)))
    gap = float(jnp.max(jnp.abs(broken - ref))) if finite else float("nan")
    assert not finite or gap > 100 * F32_ATOL, (mutation, gap)


# ---------------------------------------------------------------------------------------------
# Kernel choice, backend registry


def _kernels_in(fn, *args) -> set[str]:
    jaxpr = str(jax.make_jaxpr(fn)(*args))
    return set(re.findall(r"(fused_newton_schulz|symmetric_gram|newton_schulz_polynomial)",
                          jaxpr))


def test_auto_kernel_is_fused_when_the_matrix_fits_on_chip():
    coefficients, safety = preset("jordan", 5)
    facts = platforms.PLATFORMS["cpu"]
    small, large = jnp.ones((2, 32, 64)), jnp.ones((2, 160, 400))
    assert platforms.fused_footprint_bytes(32, 64, 4) <= facts.on_chip_bytes
    assert platforms.fused_footprint_bytes(160, 400, 4) > facts.on_chip_bytes
    run = functools.partial(pallas_newton_schulz, coefficients=coefficients, safety=safety)
    assert _kernels_in(run, small) == {"fused_newton_schulz"}
    assert _kernels_in(run, large) == {"symmetric_gram", "newton_schulz_polynomial"}
    # on a GPU the fused footprint of padded power-of-two blocks decides
    assert platforms.fused_footprint_bytes(64, 128, 2) <= platforms.PLATFORMS["gpu"].on_chip_bytes
    assert platforms.fused_footprint_bytes(128, 256, 2) > platforms.PLATFORMS["gpu"].on_chip_bytes


def test_backend_pallas_through_orthogonalize_matches_xla():
    g = _input((3, 40, 72), seed=6)
    xla = orthogonalize(g, scheme="polar_express", backend="xla", method="direct")
    pallas = orthogonalize(g, scheme="polar_express", backend="pallas")
    assert float(jnp.max(jnp.abs(pallas - xla))) < F32_ATOL


def test_muon_config_sends_its_hidden_updates_through_the_kernels(monkeypatch):
    """optim.ns_backend=pallas reaches Muon's step: one build_optimizer update of a one-block
    Transformer calls the kernels for the hidden matrices and equals the xla backend's."""
    from flax import nnx

    from optim import MuonConfig
    from scaling.config import ModelConfig, ParamConfig
    from scaling.parametrization import build_model, build_optimizer

    calls = []
    kernels = optim.kernels.pallas_newton_schulz
    monkeypatch.setattr(optim.kernels, "pallas_newton_schulz",
                        lambda *a, **k: calls.append(a[0].shape) or kernels(*a, **k))
    model, parametrization = build_model(ModelConfig(width=32, depth=1, head_dim=16),
                                         ParamConfig("mup", 32, 1), 64, seed=0)
    params = nnx.split(model)[1].to_pure_dict()
    grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(5), x.shape), params)
    updates = {}
    for backend in ("xla", "pallas"):
        cfg = MuonConfig(ns_backend=backend, ns_method="direct", schedule="constant",
                         warmup_steps=0, clip_norm=0.0)
        tx = build_optimizer(cfg, parametrization, total_steps=2)
        updates[backend] = jax.jit(tx.update)(grads, tx.init(params), params)[0]
        assert bool(calls) == (backend == "pallas"), backend
    gap = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
        jax.tree.leaves(updates["xla"]), jax.tree.leaves(updates["pallas"]), strict=True))
    assert gap < F32_ATOL * 0.02, gap  # the updates are lr = 0.02 times the directions


def test_auon_hybrid_step_runs_on_the_chosen_backend(monkeypatch):
    """The hybrid's one Newton–Schulz step goes through the kernels when asked to."""
    calls = []
    kernels = optim.kernels.pallas_newton_schulz
    monkeypatch.setattr(optim.kernels, "pallas_newton_schulz",
                        lambda *a, **k: calls.append(1) or kernels(*a, **k))
    x = _input((3, 40, 72), seed=8)
    xla = auon_direction(x, hybrid=True, backend="xla")
    assert not calls
    pallas = auon_direction(x, hybrid=True, backend="pallas")
    assert calls and float(jnp.max(jnp.abs(pallas - xla))) < F32_ATOL


def test_auto_backend_takes_pallas_only_on_a_verified_platform(monkeypatch):
    assert resolve_backend("auto") == "xla"  # CPU is never verified: the kernels interpret here
    monkeypatch.setattr(platforms, "VERIFIED_PLATFORMS", frozenset({"cpu"}))
    assert resolve_backend("auto") == "pallas"
    assert resolve_backend("xla") == "xla"


def test_bad_kernel_arguments_name_the_field():
    g = jnp.ones((2, 16, 32))
    coefficients, _ = preset("jordan", 5)
    for kwargs, field in [({"method": "gram"}, "method"), ({"kernel": "blocked"}, "kernel"),
                          ({"normalization": "nuclear"}, "normalization"), ({"tile": 0}, "tile")]:
        with pytest.raises(ValueError, match=f"orthogonalize.{field}="):
            pallas_newton_schulz(g, coefficients, **kwargs)
    with pytest.raises(ValueError, match="orthogonalize.backend='triton'"):
        orthogonalize(g, backend="triton")
    with pytest.raises(ValueError, match="platform 'metal'"):
        pallas_newton_schulz(g, coefficients, target="metal")


# ---------------------------------------------------------------------------------------------
# Lowering for TPU and GPU without the hardware

CUSTOM_CALL = {"tpu": "tpu_custom_call", "gpu": "__gpu$xla.gpu.triton"}
LOWERING_TILE = {"tpu": 128, "gpu": 64}


@pytest.mark.parametrize("target", ["tpu", "gpu"])
@pytest.mark.parametrize(("kernel", "shape"), [("fused", (3, 100, 200)), ("tiled", (3, 300, 520))])
@pytest.mark.parametrize("normalization", ["frobenius", "schatten4"])
def test_kernels_lower_for_tpu_and_gpu(target, kernel, shape, normalization):
    """Mosaic (TPU v5e) and Triton (H100) accept every kernel in bfloat16 at hardware tile
    sizes: block shapes, the integer index maps, the mirrored reads. This checks lowering, not
    execution: the compiled kernels have not run here."""
    coefficients, safety = preset("polar_express", 5)
    run = functools.partial(pallas_newton_schulz, coefficients=coefficients, safety=safety,
                            compute_dtype=jnp.bfloat16, normalization=normalization,
                            kernel=kernel, tile=LOWERING_TILE[target], target=target,
                            interpret=False)
    with abstract_device(target):
        lowered = jax.jit(run).trace(jax.ShapeDtypeStruct(shape, jnp.float32)).lower(
            lowering_platforms=(lowering_platform(target),))
    calls = re.findall(r"custom_call @(\S+)\(", lowered.as_text())
    pallas_calls = 1 if kernel == "fused" else 1 + 5 * 2 + 4  # Gram once, then per step
    assert calls == [CUSTOM_CALL[target]] * pallas_calls


# ---------------------------------------------------------------------------------------------
# Training through the kernels

RUN = ["optim=muon", "model.width=32", "model.depth=2", "param.base_width=32", "train.steps=20",
       "train.batch_size=8", "train.seq_len=64", "train.eval_every=20", "train.eval_batches=2",
       "train.log_every=4", "train.checkpoint_every=20", "optim.warmup_steps=2",
       "logging.wandb_mode=disabled", "logging.progress=false"]


@pytest.mark.slow
@pytest.mark.usefixtures("restore_root_logging")
def test_pallas_backend_trains_the_default_model_like_xla(tmp_path, monkeypatch):
    """optim.ns_backend=pallas: 20 Muon steps of the default Transformer (width 32) on the
    default corpus, every hidden update through the interpreted kernels, log the same train
    losses as ns_backend=xla (measured gaps ≤ 1e-6) and still learn (slow: 24 s in the Pallas
    interpreter; the default suite checks the backend through orthogonalize and Muon's step)."""
    calls = []
    kernels = optim.kernels.pallas_newton_schulz

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return kernels(*args, **kwargs)

    monkeypatch.setattr(optim.kernels, "pallas_newton_schulz", counted)
    results = {}
    for backend in ("xla", "pallas"):
        cfg = to_run_config(compose([*RUN, f"optim.ns_backend={backend}",
                                     f"train.out_dir={tmp_path / backend}"]))
        result = train(cfg)
        metrics = Path(result["run_dir"]) / "metrics.jsonl"
        losses = [json.loads(line)["train_loss"] for line in metrics.read_text().splitlines()]
        results[backend] = (losses, result["val_loss"])
        assert calls if backend == "pallas" else not calls, backend
    (xla_losses, xla_val), (pallas_losses, pallas_val) = results["xla"], results["pallas"]
    assert len(pallas_losses) == 5
    assert pallas_losses == pytest.approx(xla_losses, abs=1e-4)
    assert pallas_val == pytest.approx(xla_val, abs=1e-4)
    assert pallas_losses[0] - pallas_losses[-1] > 1.0, pallas_losses


def test_pallas_backend_with_the_gram_method_is_a_config_error():
    with pytest.raises(ConfigError) as error:
        to_run_config(compose(["optim=muon", "optim.ns_backend=pallas", "optim.ns_method=gram"]))
    assert error.value.field == "optim.ns_method"
    assert "direct" in str(error.value)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_platform_tiles_at_a_transformer_shape(dtype):
    """The CPU platform's own tile (32) on a stack of 4 width-256 MLP matrices, 256 × 1024 and
    transposed, through `orthogonalize` with the optimizer's defaults (slow: interpreted)."""
    g = jax.random.normal(jax.random.key(9), (4, 256, 1024))
    for x in (g, jnp.swapaxes(g, -1, -2)):
        opts = {"scheme": "polar_express", "normalization": "schatten4", "compute_dtype": dtype}
        xla = orthogonalize(x, backend="xla", method="direct", **opts)
        pallas = orthogonalize(x, backend="pallas", **opts)
        gap = _relative_gap(pallas, xla)
        assert gap < (1e-5 if dtype is None else BF16_REL), gap
