"""Top singular values by warm-started power iteration (scaling/spectral.py), against
jnp.linalg.svd: per matrix, per layer of a stacked leaf, and on a real model's parameters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.config import ModelConfig
from scaling.config import ParamConfig
from scaling.parametrization import build_model
from scaling.spectral import (
    as_matrices,
    init_vectors,
    matrix_paths,
    power_iteration,
    top_singular_values,
)


def _with_spectrum(key, singular_values, shape):
    """A (fan_in, fan_out) matrix with the given singular values and random singular vectors."""
    k1, k2 = jax.random.split(key)
    u, _ = jnp.linalg.qr(jax.random.normal(k1, (shape[0], len(singular_values))))
    v, _ = jnp.linalg.qr(jax.random.normal(k2, (shape[1], len(singular_values))))
    return (u * jnp.asarray(singular_values)) @ v.T


def _svd_max(w_BxIxO):
    return np.linalg.svd(np.asarray(w_BxIxO, np.float64), compute_uv=False)[..., 0]


def test_power_iteration_matches_svd_per_layer():
    """Three layers with different spectra (gap σ2/σ1 = 0.8): 32 iterations give σ_max to
    1e-3 relative, each layer its own; 2 iterations do not, so the check can fail."""
    layers = [_with_spectrum(jax.random.key(i), [scale, 0.8 * scale, 0.5 * scale, 0.1],
                             (48, 32)) for i, scale in enumerate((1.0, 3.0, 0.2))]
    w_BxIxO = jnp.stack(layers)
    v_BxO = jax.random.normal(jax.random.key(9), (3, 32))
    sigma, _ = jax.jit(power_iteration, static_argnums=2)(w_BxIxO, v_BxO, 32)
    np.testing.assert_allclose(sigma, _svd_max(w_BxIxO), rtol=1e-3)
    rough, _ = power_iteration(w_BxIxO, v_BxO, 2)
    assert np.max(np.abs(rough / _svd_max(w_BxIxO) - 1)) > 1e-3
    assert np.all(rough <= _svd_max(w_BxIxO) * (1 + 1e-6))  # a Rayleigh bound from below


def test_warm_start_converges_across_calls_on_a_gaussian_matrix():
    """A Gaussian matrix has a small top gap: one call of 8 iterations is off, but calls that
    start from the previous call's vector (as during training) reach svd's σ_max."""
    w_BxIxO = jax.random.normal(jax.random.key(1), (1, 96, 64)) / np.sqrt(96)
    true = _svd_max(w_BxIxO)
    v_BxO = jax.random.normal(jax.random.key(2), (1, 64))
    errors, call = [], jax.jit(power_iteration, static_argnums=2)
    for _ in range(40):
        sigma, v_BxO = call(w_BxIxO, v_BxO, 8)
        errors.append(float(abs(sigma[0] / true[0] - 1)))
    assert errors[0] > 1e-3 and errors[-1] < 1e-3, errors[::8]


def test_every_matrix_of_a_model_by_its_fan_axes():
    """Every matrix of the Transformer (embedding, Q/K/V/O and MLP per layer, readout), never a
    norm gain; a stacked leaf gives one σ per layer, each svd's."""
    model, parametrization = build_model(ModelConfig(width=64, depth=2, head_dim=16),
                                         ParamConfig(), vocab_size=256, seed=0)
    params, specs = nnx.split(model)[1].to_pure_dict(), parametrization.specs
    paths = matrix_paths(specs)
    assert ("blocks", "wq") in paths and ("readout",) in paths and ("embed",) in paths
    assert ("final_norm",) not in paths and ("blocks", "attn_norm") not in paths
    vectors = init_vectors(params, specs)
    step = jax.jit(lambda p, v: top_singular_values(p, specs, v, 16))
    for _ in range(6):
        sigmas, vectors = step(params, vectors)
    assert sigmas[("blocks", "w_up")].shape == (2,)
    for path in (("blocks", "w_up"), ("blocks", "wo"), ("readout",)):
        leaf = params
        for key in path:
            leaf = leaf[key]
        np.testing.assert_allclose(sigmas[path], _svd_max(as_matrices(leaf, specs[path])),
                                   rtol=1e-3)
