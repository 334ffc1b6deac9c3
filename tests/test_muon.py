"""Muon and AuON (docs/rules.md: Muon): routing by role, update size per scale convention, μP
width factors, agreement with optax.contrib.muon, batched = per leaf, momentum, AuON, weight
decay, config validation, and short runs that learn."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from families import column
from flax import nnx
from optax.contrib import MuonDimensionNumbers
from synthetic import assert_one_line_cli_error

import experiments.train
from experiments.compose import compose, to_run_config
from models import label_tree
from optim import MuonConfig, OptimizerConfig, optimizer_config
from optim.muon import UPDATE_SCALES, auon_direction, scale_by_muon
from optim.orthogonalize import JORDAN, orthogonalize
from optim.role_transforms import ns_compute_dtype
from optim.trees import MatrixAxes
from scaling.config import ConfigError, ModelConfig, ParamConfig
from scaling.files import read_jsonl
from scaling.parametrization import build_model, build_optimizer, make_parametrization
from scaling.training.loop import train

VOCAB = 64
BASE_WIDTH = 32
AXES = MatrixAxes(fan_in_axes=(-2,), fan_out_axes=(-1,))  # x @ W: W is (fan_in, fan_out)
# Polar Express at 8 steps lands σ within ~2e-3 of 1 on well-conditioned inputs: the update's
# size is then the scale convention alone.
EXACT_NS = {"ns_scheme": "polar_express", "ns_steps": 8}


def _model_cfg(width: int) -> ModelConfig:
    return ModelConfig(kind="transformer", width=width, depth=2, head_dim=16)


def _model(width: int = 64, param: str = "mup"):
    """(model, parametrization) of a 2-layer Transformer at `width`, base width 32."""
    return build_model(_model_cfg(width), ParamConfig(param, BASE_WIDTH, 2), VOCAB, seed=0)


def _params(model) -> dict:
    return nnx.state(model, nnx.Param).to_pure_dict()


def _optim(name: str = "muon", **overrides) -> OptimizerConfig:
    """A constant LR from step 0 and no clipping, so an update is the transform's own output."""
    values = {"lr": 0.02, "schedule": "constant", "warmup_steps": 0, "clip_norm": 0.0,
              "b1": 0.9, "b2": 0.95, "eps": 1e-8}
    return optimizer_config(name, **{**values, **overrides})


# Inputs come from numpy (jax.random would compile a kernel per shape), and no check calls
# LAPACK on a large matrix (QR, SVD): on a busy 2-core machine OpenBLAS's threads take seconds
# for one 128 × 512 SVD, while its matmuls stay fast.
def _normal(seed: int, shape: tuple[int, ...]) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _well_conditioned(seed: int, shape: tuple[int, ...]) -> jax.Array:
    """The identity on each matrix's short side plus Gaussian noise of spectral norm ≲ 0.5:
    singular values in about [0.5, 1.5], none tiny for Newton–Schulz to miss."""
    m, n = shape[-2:]
    noise = np.random.default_rng(seed).standard_normal(shape) * 0.25 / math.sqrt(max(m, n))
    return jnp.asarray(np.eye(m, n) + noise, jnp.float32)


def _spread_spectrum(seed: int, m: int, n: int, batch: tuple[int, ...] = ()) -> jax.Array:
    """U diag(σ) Vᵀ with σ log-spaced over [0.01, 1] (small shapes only: it calls QR)."""
    rng, r = np.random.default_rng(seed), min(m, n)
    u = np.linalg.qr(rng.standard_normal((*batch, m, r)))[0]
    v = np.linalg.qr(rng.standard_normal((*batch, n, r)))[0]
    return jnp.asarray((u * np.logspace(-2, 0, r)) @ np.swapaxes(v, -1, -2), jnp.float32)


def _grads(params: dict, seed: int) -> dict:
    """A well-conditioned matrix (per layer) for every matrix leaf, Gaussian for vectors."""
    leaves, treedef = jax.tree.flatten(params)
    return jax.tree.unflatten(treedef, [
        _well_conditioned(seed + i, p.shape) if p.ndim >= 2 else _normal(seed + i, p.shape)
        for i, p in enumerate(leaves)])


def _step(tx: optax.GradientTransformation):
    """tx.update compiled once: op-by-op dispatch of NS and Adam is slower on CPU."""
    return jax.jit(tx.update)


def _flat(tree) -> dict[str, jax.Array]:
    return {jax.tree_util.keystr(path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _name(path: tuple) -> str:
    """A parameter path as _flat names it: ['blocks']['wq']."""
    return "".join(f"[{key!r}]" for key in path)


def _gram(x) -> np.ndarray:
    """X Xᵀ on the short side of every matrix of x (the last two axes), in float64."""
    x = np.asarray(x, np.float64)
    x = x.reshape(-1, *x.shape[-2:])
    x = np.swapaxes(x, -1, -2) if x.shape[-2] > x.shape[-1] else x
    return x @ np.swapaxes(x, -1, -2)


def _orthogonality_error(x, scale: float | None = None) -> float:
    """max |XXᵀ/scale² − I| over the matrices of x: 0 exactly when X is scale × an orthogonal
    factor. Without `scale`, each Gram matrix is divided by its mean diagonal."""
    gram = _gram(x)
    norm = scale**2 if scale is not None else np.mean(np.diagonal(gram, axis1=-2, axis2=-1),
                                                      axis=-1)[:, None, None]
    return float(np.max(np.abs(gram / norm - np.eye(gram.shape[-1]))))


def _spectral_norms(x) -> np.ndarray:
    """‖X‖₂ of every matrix of x, by power iteration on its Gram matrix."""
    gram = _gram(x)
    v = np.random.default_rng(0).standard_normal(gram.shape[:-1])
    for _ in range(100):
        v = np.einsum("kij,kj->ki", gram, v)
        v /= np.linalg.norm(v, axis=-1, keepdims=True)
    return np.sqrt(np.einsum("ki,kij,kj->k", v, gram, v))


def _rms(x) -> float:
    return float(np.sqrt(np.mean(np.square(np.asarray(x, np.float64)))))


def _cosine(a, b) -> float:
    a, b = np.ravel(np.asarray(a, np.float64)), np.ravel(np.asarray(b, np.float64))
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


# ---------------------------------------------------------------------------------------------
# 1. Routing by role


def test_only_hidden_matrices_get_the_muon_direction():
    """optim=muon: embeddings, readout and vectors get exactly AdamW's update at
    lr × adam_lr_ratio (a constant gradient on the embedding gives Adam's constant step, not an
    orthogonalized one); every hidden matrix's update has all singular values equal to lr·s."""
    model, parametrization = _model()
    labels, params = label_tree(model), _params(model)
    lr, ratio = 0.02, 0.5
    muon = build_optimizer(_optim(lr=lr, adam_lr_ratio=ratio, **EXACT_NS), parametrization,
                           total_steps=10)
    adamw = build_optimizer(_optim("adamw", lr=lr * ratio), parametrization,
                            total_steps=10)
    first, second = _grads(params, 1), _grads(params, 2)
    # rank one: its orthogonal factor is 1/√(64·64) per entry, Adam's first step 1 per entry
    first["embed"] = jnp.ones_like(first["embed"])
    state_muon, state_adamw = muon.init(params), adamw.init(params)
    step_muon, step_adamw = _step(muon), _step(adamw)
    steps = []
    for grads in (first, second):
        u_muon, state_muon = step_muon(grads, state_muon, params)
        u_adamw, state_adamw = step_adamw(grads, state_adamw, params)
        steps.append((_flat(u_muon), _flat(u_adamw)))

    roles = _flat(labels)
    specs = {_name(path): spec for path, spec in parametrization.specs.items()}
    assert set(roles.values()) == {"input", "output", "vector", "hidden"}
    for name, role in roles.items():
        if role == "hidden":
            continue
        for u_muon, u_adamw in steps:
            np.testing.assert_allclose(u_muon[name], u_adamw[name], rtol=1e-6, atol=1e-9,
                                       err_msg=name)
    np.testing.assert_allclose(steps[0][0]["['embed']"], -lr * ratio, rtol=1e-6)

    u_muon, u_adamw = steps[0]
    for name, role in roles.items():
        if role != "hidden":
            continue
        spec = specs[name]
        s = math.sqrt(max(1.0, spec.fan_out / spec.fan_in))  # keller, the default
        assert _orthogonality_error(u_muon[name], lr * s) < 1e-3, name  # measured ~5e-6
        assert _orthogonality_error(u_adamw[name]) > 0.1, name  # AdamW's: 0.21 to 0.53


def test_scale_by_muon_rejects_a_leaf_without_matrix_axes():
    """A parameter routed to Muon without MatrixAxes is an error that names it."""
    tx = scale_by_muon({"blocks": {"w": AXES}})
    params = {"blocks": {"w": jnp.ones((4, 8)), "gain": jnp.ones((8,))}}
    state = tx.init(params)

    with pytest.raises(ValueError, match="blocks/gain has no matrix axes"):
        tx.update(params, state)


# ---------------------------------------------------------------------------------------------
# 2. Update size per scale convention

SHAPES = {"tall": (64, 16), "wide": (16, 64), "stacked": (3, 24, 48)}  # (..., fan_in, fan_out)


@pytest.mark.parametrize("convention", sorted(UPDATE_SCALES))
def test_update_size_follows_the_scale_convention(convention):
    """With B = fan_in, A = fan_out: keller RMS 1/√B, spectral norm √(A/B), moonlight RMS 0.2,
    on tall, wide and stacked leaves (each layer of the stack on its own)."""
    grads = {name: _well_conditioned(3 + i, shape) for i, (name, shape) in
             enumerate(SHAPES.items())}
    tx = scale_by_muon({name: AXES for name in SHAPES}, update_scale=convention, **EXACT_NS)

    out, _ = _step(tx)(grads, tx.init(grads))

    for name, shape in SHAPES.items():
        fan_in, fan_out = shape[-2:]
        layers = np.asarray(out[name]).reshape(-1, fan_in, fan_out)
        if convention == "spectral":
            np.testing.assert_allclose(_spectral_norms(layers), math.sqrt(fan_out / fan_in),
                                       rtol=5e-3, err_msg=name)
        else:
            rms = fan_in**-0.5 if convention == "keller" else 0.2
            for layer in layers:
                assert _rms(layer) == pytest.approx(rms, rel=5e-3), name


# ---------------------------------------------------------------------------------------------
# 3. μP width factors


@pytest.mark.parametrize(("param", "expected"), [
    ("mup", {"keller": 1.0, "spectral": 1.0, "moonlight": 0.5}),
    ("sp", {"keller": 1.0, "spectral": 1.0, "moonlight": 1.0}),
])
def test_muon_hidden_lr_factor_per_convention(param, expected):
    """At width 4× base: μP's hidden Muon LR factor is 1 (keller, spectral) and m^(-1/2) = 0.5
    (moonlight), never Adam's 1/m; SP's is 1. Other roles keep the Adam column."""
    parametrization = make_parametrization(_model_cfg(4 * BASE_WIDTH),
                                           ParamConfig(param, BASE_WIDTH, 2), VOCAB)
    adam = parametrization.optimizer_multipliers(column("adam"))
    assert adam["hidden.block"].lr == pytest.approx(0.25 if param == "mup" else 1.0)
    for convention, factor in expected.items():
        muon = parametrization.optimizer_multipliers(column("muon", update_scale=convention))
        assert muon["hidden.block"].lr == pytest.approx(factor), convention
        assert muon["hidden.block"].eps == 1.0
        for role in ("input", "output", "vector"):
            assert muon[role] == adam[role], (convention, role)


@pytest.fixture(scope="module")
def proxy_and_target():
    """μP models at the base width 32 and at 128 (m = 4)."""
    return {width: _model(width) for width in (BASE_WIDTH, 4 * BASE_WIDTH)}


@pytest.mark.parametrize("convention", sorted(UPDATE_SCALES))
def test_mup_hidden_update_spectral_norm_is_width_independent(convention, proxy_and_target):
    """One build_optimizer(muon) step under μP: each hidden matrix's update has the same spectral
    norm at width 32 and 128 (so Adam's 1/m, which is 1/4 at 128, is not stacked on top)."""
    tops = {}
    for width, (model, parametrization) in proxy_and_target.items():
        labels, params = label_tree(model), _params(model)
        grads = jax.tree.map(lambda g, role: g if role == "hidden" else jnp.zeros_like(g),
                             _grads(params, 4), labels)
        tx = build_optimizer(_optim(lr=1.0, update_scale=convention, **EXACT_NS),
                             parametrization, total_steps=10)
        updates, _ = _step(tx)(grads, tx.init(params), params)
        tops[width] = {name: _spectral_norms(u).max() for name, u in _flat(updates).items()
                       if _flat(labels)[name] == "hidden"}
        if width > BASE_WIDTH:
            assert parametrization.optimizer_multipliers(column("adam"))["hidden.block"].lr == 0.25

    assert len(tops[BASE_WIDTH]) == 6  # wq, wk, wv, wo, w_up, w_down
    for name, top in tops[BASE_WIDTH].items():
        assert tops[4 * BASE_WIDTH][name] == pytest.approx(top, rel=0.01), (name, tops)


# ---------------------------------------------------------------------------------------------
# 4. Agreement with optax.contrib.muon

TREE_SHAPES = {"blocks": {"w": (3, 16, 32)}, "proj": (32, 16), "embed": (50, 16), "gain": (16,)}
ROUTE = {"blocks": {"w": "muon"}, "proj": "muon", "embed": "adam", "gain": "adam"}
LR, ADAM_LR, BETA, B1, B2, EPS = 0.05, 0.01, 0.9, 0.8, 0.95, 1e-8


def _tree(seed: int) -> dict:
    shapes, treedef = jax.tree.flatten(TREE_SHAPES, is_leaf=lambda x: isinstance(x, tuple))
    return jax.tree.unflatten(treedef, [_normal(10 * seed + i, shape)
                                        for i, shape in enumerate(shapes)])


def _ours(nesterov: bool) -> optax.GradientTransformation:
    muon = optax.chain(
        scale_by_muon({"blocks": {"w": AXES}, "proj": AXES}, momentum=BETA, nesterov=nesterov,
                      update_scale="keller", ns_scheme="jordan", ns_steps=5,
                      ns_normalization="frobenius", ns_method="direct", ns_eps=EPS,
                      bias_correction=True),
        optax.scale_by_learning_rate(LR))
    adam = optax.adamw(ADAM_LR, b1=B1, b2=B2, eps=EPS, weight_decay=0.0)
    return optax.partition({"muon": muon, "adam": adam}, ROUTE)


def _optax(nesterov: bool) -> optax.GradientTransformation:
    dims = MuonDimensionNumbers(reduction_axis=-2, output_axis=-1)
    return optax.contrib.muon(
        LR, ns_coeffs=JORDAN, ns_steps=5, beta=BETA, eps=EPS, nesterov=nesterov,
        adam_b1=B1, adam_b2=B2, adam_learning_rate=ADAM_LR,
        muon_weight_dimension_numbers={"blocks": {"w": dims}, "proj": dims, "embed": None,
                                       "gain": None})


@pytest.mark.parametrize("nesterov", [False, True])
def test_matches_optax_contrib_muon(nesterov):
    """Configured alike (Jordan × 5, Frobenius, bias-corrected momentum, keller scale, stack axis
    as a batch), our Muon and optax's give the same updates over 4 steps: the whole tree without
    Nesterov, the hidden leaves with it (optax's Adam branch then turns into NAdam)."""
    ours, theirs = _ours(nesterov), _optax(nesterov)
    params_ours = params_theirs = _tree(0)
    state_ours, state_theirs = ours.init(params_ours), theirs.init(params_theirs)
    step_ours, step_theirs = _step(ours), _step(theirs)
    compared = {"['blocks']['w']", "['proj']"} | (set() if nesterov else {"['embed']", "['gain']"})
    for step in range(4):
        grads = _tree(step + 1)
        u_ours, state_ours = step_ours(grads, state_ours, params_ours)
        u_theirs, state_theirs = step_theirs(grads, state_theirs, params_theirs)
        flat_ours, flat_theirs = _flat(u_ours), _flat(u_theirs)
        assert compared <= flat_ours.keys()
        for name in compared:
            np.testing.assert_allclose(flat_ours[name], flat_theirs[name], rtol=1e-5, atol=1e-6,
                                       err_msg=f"step {step}: {name}")
        params_ours = optax.apply_updates(params_ours, u_ours)
        params_theirs = optax.apply_updates(params_theirs, u_theirs)


# ---------------------------------------------------------------------------------------------
# 5. Batched = per leaf

BATCH_AXES = {"a": AXES, "b": AXES, "stack": AXES, "tall": AXES,
              "moved": MatrixAxes(fan_in_axes=(0,), fan_out_axes=(2,))}  # batch axis in between
BATCH_SHAPES = {"a": (16, 32), "b": (16, 32), "stack": (3, 16, 32), "tall": (32, 16),
                "moved": (16, 2, 32)}


def test_matrices_orthogonalized_together_equal_each_alone():
    """Same-shape leaves, a stack, a tall leaf (transposed into the same group) and a leaf whose
    batch axis sits between its fan axes: one batched call gives each leaf's lone update, and
    each matrix is s · NS of its own gradient."""
    steps = [{name: _normal(50 + 10 * t + i, shape)
              for i, (name, shape) in enumerate(BATCH_SHAPES.items())} for t in range(2)]

    def run(names):
        tx = scale_by_muon({n: BATCH_AXES[n] for n in names})
        state, outs, step = tx.init({n: steps[0][n] for n in names}), [], _step(tx)
        for grads in steps:
            out, state = step({n: grads[n] for n in names}, state)
            outs.append(out)
        return outs

    together = run(list(BATCH_SHAPES))
    for name in BATCH_SHAPES:
        for out_together, out_alone in zip(together, run([name]), strict=True):
            np.testing.assert_allclose(out_together[name], out_alone[name], atol=1e-5,
                                       err_msg=name)

    first, g = together[0], steps[0]  # step 1: U ∝ G
    root2 = math.sqrt(2)  # keller s for fan_in 16, fan_out 32; 1 for the tall leaf
    np.testing.assert_allclose(first["tall"], orthogonalize(
        g["tall"], scheme="polar_express", normalization="schatten4"), atol=1e-5)
    for i in range(3):
        np.testing.assert_allclose(first["stack"][i], root2 * orthogonalize(
            g["stack"][i], scheme="polar_express", normalization="schatten4"), atol=1e-5)
    for i in range(2):
        np.testing.assert_allclose(first["moved"][:, i], root2 * orthogonalize(
            g["moved"][:, i], scheme="polar_express", normalization="schatten4"), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# 6. Momentum

MOMENTUM = 0.9
NS = {"ns_scheme": "polar_express", "ns_steps": 5, "ns_normalization": "schatten4",
      "ns_method": "direct"}


def _reference_ns(u):
    return orthogonalize(u, scheme="polar_express", steps=5, normalization="schatten4",
                         method="direct")


def _momentum_inputs():
    g1, g2 = _normal(61, (16, 48)), _normal(62, (16, 48))
    m2 = MOMENTUM * (1 - MOMENTUM) * g1 + (1 - MOMENTUM) * g2  # M after two steps
    b = MOMENTUM
    return g1, g2, m2, {
        (False, False): m2,
        (True, False): (1 - b) * g2 + b * m2,
        (True, True): b * m2 / (1 - b**3) + (1 - b) * g2 / (1 - b**2),
    }


@pytest.mark.parametrize(("nesterov", "bias_correction"),
                         [(False, False), (True, False), (True, True)])
def test_two_steps_of_momentum(nesterov, bias_correction):
    """After g1, g2: M = β(1−β)g1 + (1−β)g2 is the state, and the direction is NS(M), or with
    Nesterov NS((1−β)g2 + βM), or bias-corrected NS(βM/(1−β³) + (1−β)g2/(1−β²))."""
    g1, g2, m2, references = _momentum_inputs()
    tx = scale_by_muon({"w": AXES}, momentum=MOMENTUM, nesterov=nesterov, update_scale="spectral",
                       bias_correction=bias_correction, **NS)
    state = tx.init({"w": g1})
    _, state = tx.update({"w": g1}, state)
    out, state = tx.update({"w": g2}, state)

    np.testing.assert_allclose(state.mu["w"], m2, rtol=1e-5, atol=1e-7)
    direction = out["w"] / math.sqrt(48 / 16)  # spectral s = √(fan_out / fan_in)
    expected = _reference_ns(references[nesterov, bias_correction])
    np.testing.assert_allclose(direction, expected, atol=1e-5)
    for other, u in references.items():  # the three rules lead to different directions
        if other != (nesterov, bias_correction):
            assert float(jnp.max(jnp.abs(_reference_ns(u) - expected))) > 1e-3, other


def test_bfloat16_momentum_is_stored_in_bfloat16():
    """momentum_dtype=bfloat16 keeps μ in bfloat16 (≈ (1−β)g after one step); updates keep the
    gradient's float32."""
    g = {"w": _normal(7, (16, 48))}
    tx = scale_by_muon({"w": AXES}, momentum=MOMENTUM, momentum_dtype=jnp.bfloat16)
    state = tx.init(g)
    assert state.mu["w"].dtype == jnp.bfloat16

    out, state = tx.update(g, state)

    assert state.mu["w"].dtype == jnp.bfloat16
    assert out["w"].dtype == jnp.float32
    np.testing.assert_allclose(state.mu["w"].astype(jnp.float32), (1 - MOMENTUM) * g["w"],
                               rtol=1e-2, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# 7. AuON


def test_auon_direction_norm_and_proportionality():
    """AuON's direction has an orthogonal factor's Frobenius norm √min(M, N); the pure variant is
    the input rescaled (cosine 1), the hybrid's Newton–Schulz step bends it (cosine < 0.999)."""
    x = _spread_spectrum(8, 16, 48, batch=(3,))
    pure, hybrid = auon_direction(x), auon_direction(x, hybrid=True)

    for i in range(3):
        for out in (pure, hybrid):
            assert float(jnp.linalg.norm(out[i])) == pytest.approx(4.0, rel=0.01)
        assert _cosine(pure[i], x[i]) > 1 - 1e-5
        assert _cosine(hybrid[i], x[i]) < 0.999


@pytest.mark.parametrize("hybrid", [False, True])
def test_optim_auon_builds_and_steps(hybrid):
    """build_optimizer(name='auon'): the first update of each w_up layer (32 × 128, keller s = 2)
    has Frobenius norm lr·s·√32, along −gradient for pure AuON, bent away for the hybrid."""
    model, parametrization = _model(BASE_WIDTH)
    params = _params(model)
    tx = build_optimizer(_optim("auon", auon_hybrid=hybrid), parametrization,
                         total_steps=10)
    grads = _grads(params, 9)
    grads = {**grads, "blocks": {**grads["blocks"], "w_up": _spread_spectrum(
        10, BASE_WIDTH, 4 * BASE_WIDTH, batch=(2,))}}

    updates, _ = _step(tx)(grads, tx.init(params), params)

    for layer in range(2):
        u, g = updates["blocks"]["w_up"][layer], grads["blocks"]["w_up"][layer]
        assert float(jnp.linalg.norm(u)) == pytest.approx(0.02 * 2 * math.sqrt(32), rel=0.01)
        cosine = _cosine(-u, g)
        assert (cosine < 0.999) if hybrid else (cosine > 1 - 1e-5), cosine


# ---------------------------------------------------------------------------------------------
# 8. Weight decay


@pytest.mark.parametrize("family", ["muon", "adam"])
def test_wd_width_exponent_sets_the_hidden_decay_factor(family):
    """At m = 4: wd_width_exponent=-1 gives hidden λ × 1/4; None keeps the table (μP Adam ∝ m,
    Muon constant); other roles are untouched."""
    parametrization = make_parametrization(_model_cfg(4 * BASE_WIDTH),
                                           ParamConfig("mup", BASE_WIDTH, 2), VOCAB)
    kwargs = {"update_scale": "keller"} if family == "muon" else {}
    table = parametrization.optimizer_multipliers(column(family, **kwargs))
    scaled = parametrization.optimizer_multipliers(column(family, wd_width_exponent=-1.0, **kwargs))

    assert scaled["hidden.block"].weight_decay == pytest.approx(0.25)
    assert table["hidden.block"].weight_decay == pytest.approx(4.0 if family == "adam" else 1.0)
    for role in ("input", "output", "vector"):
        assert scaled[role] == table[role], role


def test_weight_decay_is_lr_coupled_per_role():
    """update(g, p) − update(g, 0) = −lr·mult·λ·p: hidden mult m^-1 = 1/2 with
    wd_width_exponent=-1 (m = 2), lr × adam_lr_ratio for input/output, no decay on vectors."""
    model, parametrization = _model(64)  # m = 2
    labels, params = label_tree(model), _params(model)
    lr, ratio, wd = 0.02, 0.5, 0.1
    tx = build_optimizer(_optim(lr=lr, adam_lr_ratio=ratio, weight_decay=wd,
                                wd_width_exponent=-1.0), parametrization, total_steps=10)
    grads, state, step = _grads(params, 11), tx.init(params), _step(tx)

    decayed, _ = step(grads, state, params)
    undecayed, _ = step(grads, state, jax.tree.map(jnp.zeros_like, params))

    factor = {"hidden": lr * 0.5 * wd, "input": lr * ratio * wd, "output": lr * ratio * wd,
              "vector": 0.0}
    difference = jax.tree.map(jnp.subtract, decayed, undecayed)
    for name, role in _flat(labels).items():
        np.testing.assert_allclose(_flat(difference)[name],
                                   -factor[role] * _flat(params)[name], rtol=1e-4, atol=1e-7,
                                   err_msg=name)


# ---------------------------------------------------------------------------------------------
# 9. Config


@pytest.mark.parametrize("name", ["muon", "auon"])
def test_optim_group_composes(name):
    """`optim=muon` / `optim=auon` compose into valid RunConfigs with their defaults."""
    cfg = to_run_config(compose([f"optim={name}"]))
    assert cfg.optim.name == name
    assert (cfg.optim.momentum, cfg.optim.nesterov, cfg.optim.update_scale) == (0.95, True,
                                                                                "keller")
    assert cfg.optim.adam_lr_ratio == 0.5


BAD = {
    "update_scale": ("optim.update_scale=foo", "optim.update_scale", "foo"),
    "ns_scheme": ("optim.ns_scheme=bar", "optim.ns_scheme", "bar"),
    "ns_steps": ("optim.ns_steps=0", "optim.ns_steps", "0"),
    "ns_dtype": ("optim.ns_dtype=fp8", "optim.ns_dtype", "fp8"),
    "adam_lr_ratio": ("optim.adam_lr_ratio=0", "optim.adam_lr_ratio", "0"),
    "ns_normalization": ("optim.ns_normalization=l1", "optim.ns_normalization", "l1"),
    "momentum_dtype": ("optim.momentum_dtype=int8", "optim.momentum_dtype", "int8"),
    "ns_backend": ("optim.ns_backend=cuda", "optim.ns_backend", "cuda"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_muon_setting_is_a_config_error(case, tiny_run, tmp_path, capsys, monkeypatch):
    """A bad Muon field raises ConfigError naming it, and scaling-train prints one line."""
    override, field, value = BAD[case]
    with pytest.raises(ConfigError) as error:
        to_run_config(compose(["optim=muon", override]))
    assert error.value.field == field
    assert value in repr(error.value.value)

    monkeypatch.setattr(sys, "argv", ["scaling-train"])
    assert_one_line_cli_error(experiments.train.main, [*tiny_run, "optim=muon", override],
                              capsys, "scaling-train", [f"{field}=", value], tmp_path)


# ---------------------------------------------------------------------------------------------
# 10. Short runs

# AdamW roles at lr × 0.01 barely move, so the hidden matrices must carry the learning: measured
# drops over 40 steps are 1.93 (muon) and 1.69 (auon) nats, against 0.03 with the Muon
# direction zeroed; a sign-flipped one raises the loss.
SHORT_RUN = ["model.width=32", "model.depth=2", "param.base_width=32", "train.steps=40",
             "train.batch_size=8", "train.seq_len=64", "train.eval_every=40",
             "train.eval_batches=2", "train.log_every=4", "train.checkpoint_every=40",
             "optim.warmup_steps=2", "optim.adam_lr_ratio=0.01", "logging.wandb_mode=disabled",
             "logging.progress=false"]
LEARNED_DROP = 1.2  # nats between the first and last logged train loss


@pytest.mark.usefixtures("restore_root_logging")
@pytest.mark.parametrize("name", ["muon", "auon"])
def test_short_run_learns_through_the_hidden_matrices(name, tmp_path):
    """40 steps of optim=muon / optim=auon on the default corpus: the logged train loss falls by
    at least 1.2 nats although the AdamW roles train 100× slower than the hidden matrices."""
    result = train(to_run_config(compose([*SHORT_RUN, f"optim={name}",
                                          f"train.out_dir={tmp_path / 'runs'}"])))

    records = read_jsonl(Path(result["run_dir"]) / "metrics.jsonl")
    losses = [r["train_loss"] for r in records]
    assert result["diverged"] is False
    assert len(losses) == 10
    assert losses[0] - losses[-1] >= LEARNED_DROP, losses
    assert math.isfinite(result["val_loss"]) and result["val_loss"] < losses[0] - LEARNED_DROP


@pytest.mark.slow
@pytest.mark.usefixtures("restore_root_logging")
@pytest.mark.parametrize("overrides", [["optim=muon"], ["optim=auon"],
                                       ["optim=auon", "optim.auon_hybrid=true"]])
def test_defaults_train_the_width_64_model_below_4_nats(overrides, tmp_path):
    """Each optimizer's Hydra defaults, width 64, 200 steps (slow: about a minute each)."""
    cfg = to_run_config(compose([*overrides, "model.width=64", "train.steps=200",
                                 "logging.wandb_mode=disabled", "logging.progress=false",
                                 f"train.out_dir={tmp_path / 'runs'}"]))
    result = train(cfg)
    assert result["val_loss"] < 4.0, result["val_loss"]


def test_every_orthogonalization_field_reaches_the_hidden_update():
    """build_optimizer hands optim.ns_*, momentum, nesterov and update_scale to scale_by_muon:
    its hidden update is −lr times a hand-configured scale_by_muon's, for non-default values."""
    model, parametrization = _model(64)
    params = _params(model)
    fields = {"ns_scheme": "jordan", "ns_steps": 3, "ns_normalization": "frobenius",
              "ns_method": "direct", "update_scale": "spectral", "momentum": 0.8,
              "nesterov": True}
    tx = build_optimizer(_optim(ns_dtype="bfloat16", **fields), parametrization,
                         total_steps=10)
    grads = _grads(params, seed=11)
    updates = _flat(_step(tx)(grads, tx.init(params), params)[0])
    hidden = {"blocks": {k: v for k, v in grads["blocks"].items() if v.ndim == 3}}
    for dtype, agrees in [(jnp.bfloat16, True), (None, False)]:
        hand = scale_by_muon(parametrization.matrix_axes(MuonConfig()), ns_dtype=dtype,
                             **fields)
        expected = _flat(_step(hand)(hidden, hand.init(hidden))[0])
        gaps = [float(jnp.max(jnp.abs(updates[name] + 0.02 * value)))
                for name, value in expected.items()]
        # float32 operands round differently from bfloat16 ones by far more than 1e-6
        assert (max(gaps) < 1e-6) is agrees, (dtype, max(gaps))


def test_ns_dtype_names_the_operand_dtype():
    assert ns_compute_dtype("float32") is None
    assert ns_compute_dtype("bfloat16") == jnp.bfloat16
    assert ns_compute_dtype("auto") is None  # the suite runs on CPU: float32 operands
