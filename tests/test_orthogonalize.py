"""Newton–Schulz orthogonalization: each coefficient scheme's singular-value band, the exact
symmetries of the map, and batched = per-matrix."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optim.orthogonalize import (
    PRESET_NAMES,
    gram_newton_schulz,
    newton_schulz,
    orthogonalize,
    preset,
)

# Worst |σ − 1| on inputs whose Frobenius-normalized singular values are ≥ ~0.01 (the bands of
# docs/rules.md: Muon, with a little room for float32): a wrong coefficient, a skipped step or a
# missing normalization lands far outside these.
BANDS = {("jordan", 5): 0.35, ("polar_express", 5): 0.16, ("polar_express", 6): 0.01,
         ("polar_express", 8): 2e-3, ("classical", 30): 1e-3}


def _well_conditioned(key, m: int, n: int, batch: tuple[int, ...] = (),
                      log10_min: float = -1.0) -> jax.Array:
    """U diag(σ) Vᵀ with σ spread log-uniformly over [0.1, 1]: no tiny singular values."""
    k_u, k_v = jax.random.split(key)
    r = min(m, n)
    u = jnp.linalg.qr(jax.random.normal(k_u, (*batch, m, r)))[0]
    v = jnp.linalg.qr(jax.random.normal(k_v, (*batch, n, r)))[0]
    sigma = jnp.logspace(log10_min, 0, r)
    return (u * sigma) @ jnp.swapaxes(v, -1, -2)


def _orthogonality_error(x: jax.Array) -> float:
    return float(jnp.max(jnp.abs(jnp.linalg.svd(x, compute_uv=False) - 1.0)))


@pytest.mark.parametrize(("scheme", "steps"), list(BANDS))
@pytest.mark.parametrize("shape", [(32, 32), (24, 96), (96, 24)])
@pytest.mark.parametrize("normalization", ["frobenius", "schatten4"])
def test_each_scheme_lands_in_its_band(scheme, steps, shape, normalization):
    g = _well_conditioned(jax.random.key(0), *shape)
    error = _orthogonality_error(orthogonalize(g, scheme=scheme, steps=steps,
                                               normalization=normalization))
    assert error <= BANDS[scheme, steps], (scheme, steps, shape, error)


def test_more_polar_express_steps_only_tighten_the_band():
    g = _well_conditioned(jax.random.key(1), 48, 96)
    errors = [_orthogonality_error(orthogonalize(g, scheme="polar_express", steps=k))
              for k in range(3, 9)]
    assert all(b <= a + 1e-6 for a, b in itertools.pairwise(errors)), errors
    assert errors[0] > 0.1  # three steps are not yet done: the band test above is not vacuous


@pytest.mark.parametrize("scheme", PRESET_NAMES)
def test_transpose_and_positive_scale_commute_with_the_map(scheme):
    """NS(Gᵀ) = NS(G)ᵀ (wide, tall and square) and NS(cG) = NS(G) for c > 0."""
    for shape in [(32, 32), (16, 64)]:
        g = jax.random.normal(jax.random.key(2), shape)
        o = orthogonalize(g, scheme=scheme)
        np.testing.assert_allclose(orthogonalize(g.T, scheme=scheme), o.T, atol=2e-5)
        for c in (1e-3, 7.5, 1e3):
            np.testing.assert_allclose(orthogonalize(c * g, scheme=scheme), o, atol=2e-5)


def test_batched_equals_per_matrix():
    """A stack (layers × heads × m × n) is orthogonalized matrix by matrix in one call."""
    g = _well_conditioned(jax.random.key(3), 16, 48, batch=(3, 2))
    # compiled once per shape: eager, each of the six matrices dispatched every op on its own
    polar = jax.jit(functools.partial(orthogonalize, scheme="polar_express"))
    together = polar(g)
    for i in range(3):
        for j in range(2):
            np.testing.assert_allclose(together[i, j], polar(g[i, j]),
                                       atol=1e-5)  # batched matmuls round differently
    assert together.shape == g.shape and together.dtype == g.dtype


def test_bf16_operands_accumulate_in_float32_and_stay_close():
    g = _well_conditioned(jax.random.key(4), 32, 64)
    full = orthogonalize(g, scheme="polar_express", steps=6)
    low = orthogonalize(g, scheme="polar_express", steps=6, compute_dtype=jnp.bfloat16)
    assert low.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(low - full))) < 0.05
    assert _orthogonality_error(low) < 0.05


def test_polar_express_safety_is_applied_to_all_but_the_last_quintic():
    coefficients, safety = preset("polar_express", steps=8)
    assert safety == 1.01
    a, b, c = coefficients[0]
    assert (a, b, c) == pytest.approx((8.28721201814563 / 1.01, -23.595886519098837 / 1.01**3,
                                       17.300387312530933 / 1.01**5))
    assert coefficients[-1] == (1.875, -1.25, 0.375)
    assert preset("polar_express", steps=10)[0][8:] == ((1.875, -1.25, 0.375),) * 2


def test_bad_arguments_name_the_field():
    g = jnp.ones((4, 4))
    for kwargs, field in [({"scheme": "newton"}, "preset"), ({"backend": "cuda"}, "backend"),
                          ({"steps": 0}, "steps"), ({"normalization": "spectral"}, "normalization"),
                          ({"method": "lanczos"}, "method")]:
        with pytest.raises(ValueError, match=f"orthogonalize.{field}="):
            orthogonalize(g, **kwargs)
    with pytest.raises(ValueError, match="expected a matrix"):
        newton_schulz(jnp.ones(4), [(1.0, 0.0, 0.0)])


@pytest.mark.parametrize("scheme", PRESET_NAMES)
@pytest.mark.parametrize("shape", [(16, 64), (64, 16), (24, 24), (2, 12, 40)])
def test_gram_iteration_is_the_same_map_as_the_direct_one(scheme, shape):
    """X_k = Q_k X_0 with Q_k a product of polynomials in XXᵀ: equal to the direct form."""
    g = _well_conditioned(jax.random.key(5), *shape[-2:], batch=shape[:-2], log10_min=-2.0)
    coefficients, safety = preset(scheme)
    # float32 rounding compounds in Q_k (up to 1e-4 here as σ = 0.01 is lifted 100×); a wrong
    # coefficient or step is off by 1e-1
    atol = 2e-4
    for normalization in ("frobenius", "schatten4"):
        direct = newton_schulz(g, coefficients, safety=safety, normalization=normalization)
        gram = gram_newton_schulz(g, coefficients, safety=safety, normalization=normalization)
        np.testing.assert_allclose(gram, direct, atol=atol, err_msg=f"{scheme} {normalization}")


def _dot_count(g, **kwargs) -> int:
    text = str(jax.make_jaxpr(lambda x: orthogonalize(x, scheme="jordan", **kwargs))(g))
    return text.count("dot_general")


def test_auto_takes_the_gram_form_at_high_aspect_in_float32_only():
    """5 steps: direct 3·5 products; Gram 1 + 5 + 4 + 2·4 + 1 = 19, each only m × m but one."""
    wide = jnp.ones((8, 32))
    assert _dot_count(wide, method="direct") == 15
    assert _dot_count(wide, method="gram") == 19
    assert _dot_count(wide) == 19  # aspect 4: Gram
    assert _dot_count(jnp.ones((32, 8))) == 19  # tall is transposed first
    assert _dot_count(jnp.ones((16, 24))) == 15  # aspect 1.5: direct
    assert _dot_count(wide, compute_dtype=jnp.bfloat16) == 15  # bf16 Gram products drift


def test_schatten4_normalization_is_tighter_than_frobenius():
    """With small singular values present, the tighter bound leaves less to lift: the same
    five Polar Express steps get closer to orthogonal, and they still never overshoot."""
    g = _well_conditioned(jax.random.key(6), 64, 128, log10_min=-3.0)
    errors = {n: _orthogonality_error(orthogonalize(g, scheme="polar_express", normalization=n))
              for n in ("frobenius", "schatten4")}
    assert errors["schatten4"] < 0.75 * errors["frobenius"], errors
    sigma = jnp.linalg.svd(orthogonalize(g, scheme="polar_express", steps=8,
                                         normalization="schatten4"), compute_uv=False)
    assert float(sigma.max()) < 1.01
