"""MeZO (docs/rules.md: MeZO): the estimator is unbiased with the per-leaf scales it claims, its
probes are regenerated identically wherever they are drawn, lazy and eager perturbation agree,
Sparse MeZO and stochastic rounding do what they say, and the step uses forward passes only.

Statistical checks average over a few thousand step keys (one jit + vmap program) and accept
within 5 standard errors computed from the samples; each also shows that a wrong estimator
fails the same check, so the tolerance is not too loose to catch anything. Runs through the
training loop are in test_mezo_run.py.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

import optim
from models.config import ModelConfig
from optim.config import MeZOConfig
from optim.mezo import (
    LeafProbe,
    apply_update,
    check_plan,
    curvature,
    dense_plan,
    estimated_gradient,
    layer_noise,
    leaf_noise,
    path_id,
    perturb,
    perturb_layer,
    plan_leaves,
    probe_key,
    probe_losses,
    projected_gradient,
    sparse_thresholds,
    step_key,
    stochastic_round,
)
from optim.objectives import error_rate
from scaling.config import ParamConfig
from scaling.parametrization import build_model, group_label, make_parametrization
from scaling.steps.zeroth_order import (
    ZOSetup,
    init_zo_state,
    make_estimate,
    make_zo_step,
    probe_plan,
    replay,
    stacked_names,
    step_record,
    zo_setup,
)

# The programs of these tests run once, on tiny shapes: compiled without LLVM's optimizations
# they compile in about half the time (each leaf's random draw is costly to compile), and their
# float results are the same IEEE operations either way.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

SEED = 0
N_KEYS = 4000  # step keys averaged over in the statistical checks
SE_TOLERANCE = 5.0

# ------------------------------------------------------------------------------- a quadratic

# two leaves, one of them stacked (leading axis: two layers of 2x2); few leaves keep the
# programs small, since every leaf's probe is its own random draw
SHAPES = {"stack": (2, 2, 2), "w": (2, 3)}  # ravel_pytree's (sorted) order


def _quadratic():
    """(params, L, ∇L(params), A): L(θ) = ½θᵀAθ + bᵀθ over the flattened leaves, A SPD."""
    rng = np.random.default_rng(0)
    params = {name: jnp.asarray(rng.normal(size=shape), jnp.float32)
              for name, shape in SHAPES.items()}
    theta = np.asarray(ravel_pytree(params)[0], np.float64)
    m = rng.normal(size=(theta.size, theta.size))
    a = m @ m.T / theta.size + np.eye(theta.size)
    b = rng.normal(size=theta.size)

    def loss(p):
        x = ravel_pytree(p)[0]
        return 0.5 * x @ jnp.asarray(a, jnp.float32) @ x + jnp.asarray(b, jnp.float32) @ x

    return params, loss, a @ theta + b, a


PARAMS, LOSS, GRAD, HESSIAN = _quadratic()


def _plan(**fields) -> dict:
    """A LeafProbe per leaf of PARAMS ("stack" stacked); `fields[name]` sets that leaf's."""
    return {name: LeafProbe(path_id((name,)), stacked=name == "stack", **fields.get(name, {}))
            for name in SHAPES}


def _flat(tree) -> np.ndarray:
    """A tree like PARAMS, with any leading sample axes, as (..., n) in ravel_pytree's order."""
    return np.concatenate([np.asarray(tree[n]).reshape(
        *np.shape(tree[n])[:np.ndim(tree[n]) - len(shape)], -1) for n, shape in SHAPES.items()],
        axis=-1)


def _per_coordinate(values: dict) -> np.ndarray:
    """A number per leaf, broadcast to each of its coordinates."""
    return _flat({name: np.full(shape, values[name], np.float64)
                  for name, shape in SHAPES.items()})


STACK = _per_coordinate({"stack": 1, "w": 0}).astype(bool)  # the stacked leaf's coordinates
EPS = 1e-2  # float32 losses: ε² must stay well above their rounding for the curvature
# per-leaf probe scale D, update scale U and ε scale e of the "scaled" plan
D, U, E = {"stack": 1.5, "w": 0.5}, {"stack": 0.5, "w": 1.0}, {"stack": 0.25, "w": 4.0}
PLANS = {"isotropic": _plan(),
         "scaled": _plan(**{n: {"probe_scale": D[n], "update_scale": U[n], "eps_scale": E[n]}
                            for n in SHAPES})}


def _keys(n: int = N_KEYS) -> jax.Array:
    return jax.vmap(lambda i: step_key(SEED, i))(jnp.arange(n))


@functools.cache
def _samples() -> dict[str, dict[str, np.ndarray]]:
    """Per plan and step key (N_KEYS), 2 probes each: "g" (N, 2); "z0" (N, n) the first probe's
    z; "one" and "two" (N, n) the step direction estimated_gradient from the first probe and
    from both; "curvature" (N,) the probes' mean (L⁺ + L⁻ − 2L⁰)/ε²; "stack_drawn_whole" the
    stacked leaf's z drawn for the whole stack at once instead of layer by layer."""

    def draw(plan, key):
        thresholds = sparse_thresholds(PARAMS, plan, 0.0)
        # the losses as probe_losses takes them, unrolled so that the compiler shares each
        # probe's draw between L⁺, L⁻ and z (every draw is costly to compile)
        plus, minus = (jnp.stack([LOSS(perturb(PARAMS, plan, thresholds, probe_key(key, i), s))
                                  for i in range(2)]) for s in (EPS, -EPS))
        gs = projected_gradient(plus, minus, EPS)
        z0, z1 = (jax.tree.map(lambda x, p, i=i: leaf_noise(probe_key(key, i), p, x.shape),
                               PARAMS, plan) for i in range(2))
        direction = lambda *zs: jax.tree.map(
            lambda p, *z: estimated_gradient(p, list(z), gs[:len(z)]), plan, *zs)
        whole_key = jax.random.fold_in(probe_key(key, 0), plan["stack"].leaf_id)
        return {"g": gs, "z0": z0, "one": direction(z0), "two": direction(z0, z1),
                "curvature": jnp.mean(curvature(plus, minus, LOSS(PARAMS), EPS)),
                "stack_drawn_whole": jax.random.normal(whole_key, SHAPES["stack"])}

    out = jax.device_get(_jit(jax.vmap(lambda key: {
        name: draw(plan, key) for name, plan in PLANS.items()}))(_keys()))
    return {name: {k: _flat(v) if k in ("z0", "one", "two") else np.asarray(v)
                   for k, v in draws.items()} for name, draws in out.items()}


def _within_se(samples: np.ndarray, expected) -> bool:
    """Every coordinate's sample mean is within SE_TOLERANCE standard errors of `expected`."""
    mean = samples.mean(axis=0)
    se = samples.std(axis=0, ddof=1) / np.sqrt(samples.shape[0])
    return bool(np.all(np.abs(mean - expected) <= SE_TOLERANCE * se))


def test_direction_is_an_unbiased_gradient_estimate():
    """mean over step keys of g·z is ∇L within 5 SE on every coordinate, the stacked leaf's
    included; the same check rejects g paired with another step's z, and a stacked leaf whose
    update z is drawn whole while its perturbation's is drawn layer by layer."""
    samples = _samples()["isotropic"]
    assert _within_se(samples["one"], GRAD)
    g = samples["g"][:, :1]
    assert not _within_se(g * np.roll(samples["z0"], 1, axis=0), GRAD)
    whole = samples["one"].copy()
    whole[:, STACK] = g * samples["stack_drawn_whole"].reshape(N_KEYS, -1)
    assert not _within_se(whole, GRAD)
    assert _within_se(whole[:, ~STACK], GRAD[~STACK])  # only the stacked leaf is off


def test_expected_step_is_probe_times_update_scale_whatever_the_eps_scale():
    """Per leaf probe scale D, update scale U and ε scale e ∈ {4, ¼}: the mean step is D·U·∇
    within 5 SE; an update that forgot to divide by e (mean e·D·U·∇) or that used D² (mean
    D²·∇) fails the same check."""
    samples = _samples()["scaled"]["one"]
    assert _within_se(samples, _per_coordinate({n: D[n] * U[n] for n in SHAPES}) * GRAD)
    assert not _within_se(samples, _per_coordinate({n: E[n] * D[n] * U[n] for n in SHAPES})
                          * GRAD)
    assert not _within_se(samples, _per_coordinate({n: D[n] ** 2 for n in SHAPES}) * GRAD)


def test_n_probes_average_and_shrink_the_variance():
    """2 probes per step: still unbiased, and the total variance of the step halves."""
    samples = _samples()["isotropic"]
    assert _within_se(samples["two"], GRAD)
    ratio = samples["one"].var(axis=0).sum() / samples["two"].var(axis=0).sum()
    assert 1.6 < ratio < 2.5, ratio  # the variance goes as 1/n_probes


def test_curvature_estimates_the_probe_weighted_hessian_trace():
    """mean over keys of (L⁺ + L⁻ − 2L⁰)/ε² is trace(SAS), S = e·D per coordinate, within 5 SE,
    and trace(A) for isotropic probes; trace(A) for the scaled probes is rejected."""
    s = _per_coordinate({n: D[n] * E[n] for n in SHAPES})
    scaled = _samples()["scaled"]["curvature"][:, None]
    assert _within_se(scaled, np.trace(s[:, None] * HESSIAN * s[None, :]))
    assert not _within_se(scaled, np.trace(HESSIAN))
    assert _within_se(_samples()["isotropic"]["curvature"][:, None], np.trace(HESSIAN))


# ---------------------------------------------------------------------------- probe identity


def test_probes_are_regenerated_identically_for_perturbation_and_update():
    """perturb moves each leaf by s·e·D·z and apply_update (2 probes, weight decay) by
    −lr·((g₀z₀ + g₁z₁)/2·U/e + λθ), with z_i = leaf_noise(probe key i); a stacked leaf's layer l
    is layer_noise(…, l) bit for bit, in the eager draw and in the per-layer transform, and
    perturb(stacked=False) leaves it for the transform."""
    plan = _plan(w={"probe_scale": 2.0, "update_scale": 3.0, "eps_scale": 0.5,
                    "weight_decay": 0.5},
                 stack={"probe_scale": 0.5, "eps_scale": 2.0})
    key = step_key(SEED, 7)
    gs, lr, scale, weight_decay = jnp.array([0.75, -1.5]), 0.1, 1e-2, 0.2
    stack, probe = PARAMS["stack"], plan["stack"]

    @_jit
    def draws(params):
        thresholds = sparse_thresholds(params, plan, 0.0)
        k0 = probe_key(key, 0)
        lazy = perturb_layer({"stack": probe}, {"stack": thresholds["stack"]}, k0, scale)
        return {"perturbed": perturb(params, plan, thresholds, k0, scale),
                "updated": apply_update(params, plan, thresholds, key, gs, lr, weight_decay),
                "z": [{n: leaf_noise(probe_key(key, i), plan[n], x.shape)
                       for n, x in params.items()} for i in range(2)],
                "layer_z": [layer_noise(k0, probe, stack.shape[1:], i) for i in range(2)],
                "lazy": [lazy({"stack": params["stack"][i]}, jnp.asarray(i))["stack"]
                         for i in range(2)],
                "left": perturb(params, plan, thresholds, k0, scale, stacked=False)["stack"]}

    out = jax.device_get(draws(PARAMS))
    z0, z1 = out["z"]
    for name, x in PARAMS.items():
        p = plan[name]
        np.testing.assert_allclose(out["perturbed"][name] - x,
                                   scale * p.eps_scale * p.probe_scale * z0[name], rtol=1e-4,
                                   atol=1e-7, err_msg=name)
        step = (gs[0] * z0[name] + gs[1] * z1[name]) / 2 * p.update_scale / p.eps_scale
        np.testing.assert_allclose(out["updated"][name] - x,
                                   -lr * (step + weight_decay * p.weight_decay * x),
                                   rtol=1e-4, atol=1e-6, err_msg=name)
    for layer in range(stack.shape[0]):
        assert np.array_equal(out["layer_z"][layer], z0["stack"][layer])
        assert np.array_equal(out["lazy"][layer], out["perturbed"]["stack"][layer])
    assert np.array_equal(out["left"], stack)


def test_every_leaf_layer_probe_and_step_draws_its_own_z():
    """z differs between layers, leaves of one shape, probes and steps (no shared stream); a
    leaf's id is its path's crc32, the same in every process; a plan reusing an id is refused."""
    a, b = LeafProbe(path_id(("a",))), LeafProbe(path_id(("b",)))
    key = step_key(SEED, 3)
    draws = _jit(lambda key: [
        layer_noise(key, a, (16,), 0), layer_noise(key, a, (16,), 1),
        layer_noise(key, b, (16,), 0), layer_noise(probe_key(key, 1), a, (16,), 0),
        layer_noise(step_key(SEED, 4), a, (16,), 0)])(key)
    for i in range(len(draws)):
        for j in range(i):
            assert not np.allclose(draws[i], draws[j]), (i, j)
    assert path_id(("blocks", "wq")) == 54767592
    assert path_id(["blocks", "wq"]) == path_id(("blocks", "wq")) != path_id(("blocks", "wk"))
    with pytest.raises(ValueError, match="used twice"):
        check_plan({"a": a, "b": dataclasses.replace(b, leaf_id=a.leaf_id)})


def test_probe_losses_takes_each_probe_at_plus_and_minus_eps():
    """probe_losses returns (L(probe key i, +ε), L(probe key i, −ε)) for i < n, in order."""
    key = step_key(SEED, 5)
    loss_at = lambda k, s: jax.random.key_data(k).sum().astype(jnp.float32) % 1000 + s
    plus, minus = _jit(lambda key: probe_losses(loss_at, key, 3, 0.25))(key)
    expected = [loss_at(probe_key(key, i), 0.0) for i in range(3)]
    np.testing.assert_array_equal(plus, np.add(expected, 0.25))
    np.testing.assert_array_equal(minus, np.subtract(expected, 0.25))
    assert len(set(np.asarray(expected).tolist())) == 3


# --------------------------------------------------------------------------- Sparse MeZO unit


def test_sparse_mask_freezes_large_weights_in_perturbation_and_update():
    """With sparsity 0.75 only the 25% smallest |θ| of a matrix, and of each layer of a stack
    (whose layers differ in scale 10×), are perturbed and updated; the rest stay bit for bit,
    weight decay included."""
    rng = np.random.default_rng(1)
    params = {"m": jnp.asarray(rng.normal(size=(16, 16)), jnp.float32),
              "s": jnp.asarray(rng.normal(size=(2, 16, 16)) * [[[1.0]], [[10.0]]], jnp.float32)}
    plan = {"m": LeafProbe(1, sparse=True, weight_decay=1.0),
            "s": LeafProbe(2, stacked=True, sparse=True, weight_decay=1.0)}
    key = step_key(SEED, 0)

    @_jit
    def run(params):
        thresholds = sparse_thresholds(params, plan, 0.75)
        return thresholds, perturb(params, plan, thresholds, probe_key(key, 0), 0.1), \
            apply_update(params, plan, thresholds, key, jnp.array([1.0]), 0.1, weight_decay=0.5)

    thresholds, perturbed, updated = jax.device_get(run(params))
    assert thresholds["s"].shape == (2,) and thresholds["s"][1] > 5 * thresholds["s"][0]
    for name in ("m", "s"):
        x = np.asarray(params[name])
        frozen = np.abs(x) > np.reshape(thresholds[name], (-1,) + (1,) * (x.ndim - 1))
        for after in (perturbed[name], updated[name]):
            assert np.array_equal(after[frozen], x[frozen]), name
            moved = (after != x).reshape(-1, 256)  # per layer: each has its own threshold
            assert np.all(np.abs(moved.mean(axis=1) - 0.25) < 0.02), (name, moved.mean(1))


# ------------------------------------------------------------------------ stochastic rounding


def test_stochastic_rounding_is_unbiased_between_bf16_neighbours():
    """A float32 value 30% of the way from 1 to the next bf16 (1 + 2⁻⁷) rounds to one of the two,
    with mean the value within 5 SE (round-to-nearest would give 1 exactly); negative alike."""
    values = np.array([1.0 + 0.3 * 2**-7, -(3.0 + 0.9 * 2**-6)])
    x = jnp.asarray(np.repeat(values[None], 20000, axis=0), jnp.float32)
    rounded = _jit(stochastic_round, static_argnums=1)(x, jnp.bfloat16, jax.random.key(0))
    assert rounded.dtype == jnp.bfloat16
    samples = np.asarray(rounded, np.float64)
    for column, value in enumerate(values):
        neighbours = np.unique(samples[:, column])
        assert len(neighbours) == 2 and neighbours[0] < value < neighbours[1], neighbours
    assert _within_se(samples, values)
    assert not _within_se(np.asarray(x.astype(jnp.bfloat16), np.float64), values)


def test_stochastic_rounding_keeps_exact_values_and_non_finite_ones():
    """bf16 values round-trip unchanged whatever the key; ±inf, nan and ±0 stay; float32
    passes through; any other dtype is refused."""
    exact = jnp.asarray(np.random.default_rng(0).normal(size=1000) * 100).astype(jnp.bfloat16)
    special = jnp.array([np.inf, -np.inf, np.nan, 0.0, -0.0], jnp.float32)
    x = jnp.concatenate([exact.astype(jnp.float32), special])
    rounded = _jit(jax.vmap(lambda k: stochastic_round(x, jnp.bfloat16, k)))(
        jax.random.split(jax.random.key(0), 4))
    for out in np.asarray(rounded, np.float32):
        assert np.array_equal(out[:1000], np.asarray(exact, np.float32))
        assert out[1000] == np.inf and out[1001] == -np.inf and np.isnan(out[1002])
        assert np.array_equal(np.signbit(out[1003:]), [False, True]) and not np.any(out[1003:])
    assert stochastic_round(x, jnp.float32, jax.random.key(0)) is x
    with pytest.raises(ValueError, match="float16"):
        stochastic_round(x, jnp.float16, jax.random.key(0))


def test_updates_below_bf16_resolution_still_move_bf16_weights():
    """bf16 weights at 1.5 (spacing 2⁻⁷) take a step −lr·g·z of ~1e-3, under half a spacing: with
    stochastic rounding some of them move, and E[Δ·z] = −lr·g within 5 SE; rounding to nearest
    leaves almost all of them where they were, which the same check rejects."""
    n, lr, g = 20000, 1e-3, 1.0
    params = {"w": jnp.full((n,), 1.5, jnp.bfloat16)}
    plan = {"w": LeafProbe(path_id(("w",)))}
    key = step_key(SEED, 0)

    @_jit
    def run(params):
        updated = apply_update(params, plan, sparse_thresholds(params, plan, 0.0), key,
                               jnp.array([g]), lr)
        return updated["w"], leaf_noise(probe_key(key, 0), plan["w"], (n,))

    updated, z = run(params)
    assert updated.dtype == jnp.bfloat16
    delta, z = np.asarray(updated, np.float64) - 1.5, np.asarray(z, np.float64)
    assert 0.05 < np.mean(delta != 0) < 0.5  # each moves with probability |step|/spacing
    assert _within_se((delta * z)[:, None], -lr * g)  # E[Δ·z] = −lr·g·E[z²]
    nearest = np.asarray((1.5 - lr * g * z).astype(jnp.bfloat16), np.float64) - 1.5
    assert np.mean(nearest != 0) < 1e-3  # only |z| > 3.9 gets past half a spacing
    assert not _within_se((nearest * z)[:, None], -lr * g)


# ------------------------------------------------------------------------------------- replay


def test_replay_leaves_the_initial_parameters_usable():
    """replay(params, …) twice from the same float32 parameters: both replays agree and the
    initial parameters can still be read."""
    setup = ZOSetup(MeZOConfig(), {"w": LeafProbe(path_id(("w",)))}, {}, SEED, total_steps=1)
    params = {"w": jnp.ones((4,), jnp.float32)}
    records = [{"step": 1, "g": [1.0], "lr": 0.1}]
    first, second = replay(params, setup, records), replay(params, setup, records)
    assert np.array_equal(first["w"], second["w"])
    assert np.array_equal(params["w"], np.ones(4))


# ------------------------------------------------------------------------------ optax adapter


def test_optax_adapter_steps_like_apply_update():
    """chain(zo_gradient(eps, seed, plan), sgd(lr)) gives apply_update's parameters for (seed,
    step) and the g of the same probes, at step 0 and step 1 (the count advances the key), with
    a plan of scaled and stacked leaves; its default plan is dense_plan's, ids from the paths."""
    eps, lr, seed, plan = 1e-3, 0.05, 3, PLANS["scaled"]
    tx = optax.chain(optim.zo_gradient(eps=eps, seed=seed, plan=plan), optax.sgd(lr))

    @_jit
    def both(params, state, step):
        updates, state = tx.update(None, state, params, value_fn=LOSS)
        key, thresholds = step_key(seed, step), sparse_thresholds(params, plan, 0.0)
        gs = projected_gradient(*probe_losses(
            lambda k, s: LOSS(perturb(params, plan, thresholds, k, s)), key, 1, eps), eps)
        return optax.apply_updates(params, updates), state, apply_update(
            params, plan, thresholds, key, gs, lr)

    params, state = PARAMS, tx.init(PARAMS)
    for step in range(2):
        via_optax, state, via_mezo = both(params, state, step)
        for a, b in zip(jax.tree.leaves(via_optax), jax.tree.leaves(via_mezo), strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-7)
        assert not np.allclose(_flat(via_optax), _flat(params))
        params = via_optax
    assert [p.leaf_id for p in plan_leaves(dense_plan(PARAMS))] == [path_id((n,)) for n in SHAPES]


def test_optax_adapter_composes_with_adam():
    """chain(zo_gradient(), adam) on the quadratic, from loss values only: 300 steps close 90% of
    the gap to the minimum; bad eps or n_probes are refused."""
    tx = optax.chain(optim.zo_gradient(eps=1e-3, seed=0), optax.adam(0.05))

    def step(carry, _):
        params, state = carry
        updates, state = tx.update(None, state, params, value_fn=LOSS)
        return (optax.apply_updates(params, updates), state), None

    (params, _), _ = _jit(lambda p: jax.lax.scan(step, (p, tx.init(p)), length=300))(PARAMS)
    b = GRAD - HESSIAN @ _flat(PARAMS)
    minimum = -0.5 * b @ np.linalg.solve(HESSIAN, b)
    start, end = float(LOSS(PARAMS)), float(LOSS(params))
    assert end - minimum < 0.1 * (start - minimum), (start, end, minimum)
    for bad in ({"eps": 0.0}, {"n_probes": 0}):
        with pytest.raises(ValueError, match="expected eps > 0 and n_probes >= 1"):
            optim.zo_gradient(**bad)


# ----------------------------------------------------------------------- models: lazy = eager

VOCAB = 64
# a rolled scan over the layers: one copy of each layer's probe draw in the compiled program
TINY = {"transformer": ModelConfig(width=32, depth=2, head_dim=8, compute_dtype="float32",
                                   scan_unroll=1),
        "mlp": ModelConfig(kind="mlp", width=32, depth=2, context=4, compute_dtype="float32",
                           scan_unroll=1)}


@functools.cache
def _tiny_model(kind: str):
    """(graphdef, params, parametrization) of a tiny μP model; copy params before a step,
    which donates them."""
    model, parametrization = build_model(TINY[kind], ParamConfig("mup", base_width=16), VOCAB,
                                         seed=0)
    graphdef, state = nnx.split(model)
    return graphdef, state.to_pure_dict(), parametrization


def _batch(b: int = 4, t: int = 16):
    tokens = np.random.default_rng(0).integers(0, VOCAB, (b, t + 1)).astype(np.int32)
    return tokens[:, :-1], tokens[:, 1:]


def test_lazy_and_eager_perturbation_give_identical_logits():
    """The Transformer's forward on perturb(stacked=True) (the whole tree) and on perturb(
    stacked=False) plus the per-layer transform gives the same logits bit for bit, hence the
    same g and the same update; matched probes, fan_in ε and Sparse MeZO on, so that every scale
    acts. (The byte MLP's is checked on the real estimate program in test_mezo_run.py.)"""
    graphdef, params, parametrization = _tiny_model("transformer")
    cfg = MeZOConfig(sparsity=0.5, probe_scaling="matched", eps_scaling="fan_in")
    setup = zo_setup(cfg, parametrization, total_steps=1, seed=SEED)
    inputs, _ = _batch()

    @_jit
    def logits(params, key):
        thresholds = sparse_thresholds(params, setup.plan, cfg.sparsity)
        forward = lambda p, transform=None: nnx.merge(graphdef, p)(inputs, transform)
        eager = forward(perturb(params, setup.plan, thresholds, key, cfg.eps))
        lazy = forward(perturb(params, setup.plan, thresholds, key, cfg.eps, stacked=False),
                       perturb_layer(setup.at_names(setup.plan), setup.at_names(thresholds),
                                     key, cfg.eps))
        return eager, lazy, forward(params)

    eager, lazy, clean = logits(params, probe_key(step_key(SEED, 0), 0))
    assert np.array_equal(eager, lazy)
    assert not np.allclose(lazy, clean, rtol=0, atol=1e-6)  # the layers were perturbed


# ----------------------------------------------------------------- the step: forward passes only


def _count(jaxpr, primitive: str) -> int:
    """Occurrences of `primitive` in a jaxpr, inside scans, maps, conds and calls too."""
    total = 0
    for eqn in jaxpr.eqns:
        total += eqn.primitive.name == primitive
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    total += _count(inner, primitive)
    return total


@pytest.mark.parametrize("curvature_on", [False, True])
def test_estimate_runs_forward_passes_only(curvature_on):
    """The estimate program holds exactly one forward's matmuls, looped over both signs and
    every probe (2 with the curvature monitor's clean forward), whatever n_probes: no backward
    pass, which would add 2 more per forward."""
    graphdef, params, parametrization = _tiny_model("transformer")
    setup = zo_setup(MeZOConfig(curvature=curvature_on, n_probes=2), parametrization,
                     total_steps=10, seed=SEED)
    state = init_zo_state(params, setup, 1e-3)
    inputs, targets = _batch()
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
        nnx.merge(graphdef, p)(inputs), targets).mean()
    forward = _count(jax.make_jaxpr(loss)(params).jaxpr, "dot_general")
    assert forward > 0
    estimate = make_estimate(graphdef, setup)
    jaxpr = jax.make_jaxpr(estimate)(state.params, state.opt_state, state.lr, inputs,
                                     targets).jaxpr
    assert _count(jaxpr, "dot_general") == (2 if curvature_on else 1) * forward
    backward = _count(jax.make_jaxpr(jax.value_and_grad(loss))(params).jaxpr, "dot_general")
    # what the check would see of a gradient: two more per differentiated matmul (the forward
    # also holds the attention-Z indicator's, which no gradient flows through)
    assert backward > 2 * forward


def test_mezo_lowers_a_non_differentiable_objective():
    """optim.objective=accuracy: the error rate, piecewise constant with zero gradient, falls
    from ~1 to near 0 under MeZO on a fixed batch (every target token 7) within 60 steps; with 2
    probes each step's record holds both g."""
    graphdef, params, parametrization = _tiny_model("mlp")
    inputs, _ = _batch(b=8)
    targets = np.full_like(inputs, 7)
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, VOCAB)), jnp.float32)
    assert not np.any(jax.grad(error_rate)(logits, targets[:2, :3]))  # nothing to descend
    cfg = MeZOConfig(lr=3.0, eps=0.3, objective="accuracy", n_probes=2)
    setup = zo_setup(cfg, parametrization, total_steps=60, seed=SEED)
    state = init_zo_state(jax.tree.map(jnp.copy, params), setup, cfg.lr)
    step = make_zo_step(graphdef, setup)
    errors, records = [], []
    for i in range(60):
        before = state.loss_sum
        state = step(state, inputs, targets)
        errors.append(float(state.loss_sum - before))
        records.append(step_record(i + 1, state.opt_state.g, state.opt_state.lr_used))
    assert np.mean(errors[:5]) > 0.95 and np.mean(errors[-10:]) < 0.2, np.round(errors, 2)
    assert all(len(r["g"]) == 2 for r in records) and any(r["g"][0] != r["g"][1] for r in records)


# ----------------------------------------------------------------------------- probe plan


def _plan_at(cfg: MeZOConfig, kind: str = "transformer"):
    model_cfg = dataclasses.replace(TINY[kind], width=128)  # 4× the base width 32
    parametrization = make_parametrization(model_cfg, ParamConfig("mup", base_width=32), VOCAB)
    return parametrization, probe_plan(parametrization, cfg)


def _leaf(tree, path):
    for key in path:
        tree = tree[key]
    return tree


MUP_SGD_SCALE = {"input": 2.0, "output": 2.0, "vector": 2.0, "hidden": 1.0}  # √ of 4, 4, 4, 1


def test_matched_probe_scales_are_the_root_of_mup_sgd_multipliers():
    """μP at 4× the base width: matched D (or U) is √(the group's SGD LR multiplier): 2 for
    input, output and vectors, 1 for hidden matrices; isotropic is 1 everywhere."""
    cfg = MeZOConfig(probe_scaling="matched")
    parametrization, plan = _plan_at(cfg)
    multipliers = parametrization.optimizer_multipliers(cfg)
    for path, spec in parametrization.specs.items():
        probe = _leaf(plan, path)
        assert probe.probe_scale == pytest.approx(MUP_SGD_SCALE[spec.role]), path
        assert probe.probe_scale == pytest.approx(multipliers[group_label(spec)].lr ** 0.5)
        assert probe.update_scale == 1.0 and probe.eps_scale == 1.0
    _, plan = _plan_at(MeZOConfig(update_scaling="matched"))
    for path, spec in parametrization.specs.items():
        probe = _leaf(plan, path)
        assert (probe.probe_scale, probe.update_scale) == (
            1.0, pytest.approx(MUP_SGD_SCALE[spec.role])), path
    _, plan = _plan_at(MeZOConfig())
    for probe in plan_leaves(plan):
        assert (probe.probe_scale, probe.update_scale, probe.eps_scale) == (1.0, 1.0, 1.0)


@pytest.mark.parametrize("kind", sorted(TINY))
def test_probe_plan_eps_decay_sparsity_and_stacking(kind):
    """fan_in ε scaling is (fan_in mult)^(−1/2) (hidden and readout ½, embeddings and vectors 1);
    vectors take no weight decay and no sparse mask; matrices take the group's decay and the
    mask; a leaf is stacked iff its first logical axis is "layers"; ids are the paths' ids."""
    cfg = MeZOConfig(eps_scaling="fan_in", weight_decay=0.1)
    parametrization, plan = _plan_at(cfg, kind)
    multipliers = parametrization.optimizer_multipliers(cfg)
    roles = set()
    for path, spec in parametrization.specs.items():
        probe, roles = _leaf(plan, path), roles | {spec.role}
        fan_in_mult = spec.fan_in / parametrization.base_specs[path].fan_in
        assert probe.eps_scale == pytest.approx(fan_in_mult**-0.5), path
        assert probe.eps_scale == (0.5 if spec.role in ("hidden", "output") else 1.0), path
        assert probe.stacked == (spec.logical_axes[0] == "layers"), path
        assert probe.leaf_id == path_id(path)
        if spec.role == "vector":
            assert probe.weight_decay == 0.0 and not probe.sparse, path
        else:
            assert probe.sparse, path
            assert probe.weight_decay == multipliers[group_label(spec)].weight_decay, path
    assert roles == {"input", "hidden", "output", "vector"}
    names = stacked_names(parametrization)
    assert names and all(_leaf(plan, p).stacked and p[-1] == n for n, p in names.items())
    assert len(names) == sum(p.stacked for p in plan_leaves(plan))
