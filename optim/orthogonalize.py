"""Newton–Schulz orthogonalization: the one entry point Muon-family optimizers call.

Each step maps the singular values of X by an odd quintic p(σ) = aσ + bσ³ + cσ⁵ (computed as
A = XXᵀ, X ← aX + (bA + cA²)X on the short side), after X is scaled by its Frobenius norm (or
the tighter Schatten-4 norm) so that every σ ≤ 1. Coefficient schemes are data (docs/rules.md:
Muon); backends register in BACKENDS (`xla`: the pure-jnp direct and Gram forms;
`pallas`: the kernels in optim/kernels).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, get_args

import jax
import jax.numpy as jnp

from optim.kernels.ns_math import matmul_in, normalized_gram, short_side_first

Coefficients = tuple[float, float, float]

JORDAN: Coefficients = (3.4445, -4.7750, 2.0315)  # fast, lands σ in about [0.68, 1.14]
# Polar Express (Amsel et al. 2025): one minimax-optimal quintic per step; past 8, the last repeats.
POLAR_EXPRESS: tuple[Coefficients, ...] = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)
POLAR_EXPRESS_SAFETY = 1.01  # room for the float error of the norm estimate
CLASSICAL: Coefficients = (15 / 8, -10 / 8, 3 / 8)  # converges to exactly 1, slowly from small σ
NSScheme = Literal["jordan", "polar_express", "classical"]  # optim.ns_scheme
PRESET_NAMES = get_args(NSScheme)


def preset(name: str, steps: int | None = None) -> tuple[tuple[Coefficients, ...], float]:
    """(per-step coefficients, safety factor) of a named scheme; `steps` defaults per scheme."""
    if steps is not None and steps < 1:
        raise ValueError(f"orthogonalize.steps={steps!r}: expected a positive integer")
    if name == "jordan":
        return (JORDAN,) * (steps or 5), 1.0
    if name == "polar_express":
        s = POLAR_EXPRESS_SAFETY
        # every quintic but the final (already convergent) one is evaluated at σ/s
        safe = [(a / s, b / s**3, c / s**5) for a, b, c in POLAR_EXPRESS[:-1]] + [POLAR_EXPRESS[-1]]
        n = steps or 5
        return tuple(safe[min(i, len(safe) - 1)] for i in range(n)), s
    if name == "classical":
        return (CLASSICAL,) * (steps or 30), 1.0
    raise ValueError(f"orthogonalize.preset={name!r}: expected one of {sorted(PRESET_NAMES)}")


NSMethod = Literal["auto", "direct", "gram"]  # optim.ns_method
METHODS = get_args(NSMethod)
GRAM_MIN_ASPECT = 2.0  # long/short side at which the Gram iteration needs fewer FLOPs (5 steps)


def newton_schulz(g: jax.Array, coefficients: Sequence[Coefficients], *, safety: float = 1.0,
                  eps: float = 1e-7, compute_dtype=None,
                  normalization: str = "frobenius") -> jax.Array:
    """NS over the last two axes of `g` (any leading axes are a batch), in `g`'s dtype.

    The reference: every step forms A = XXᵀ from X. `compute_dtype` (e.g. bfloat16) sets the
    matmul operands; products accumulate in float32.
    """
    x, tall = short_side_first(g)
    matmul = matmul_in(compute_dtype or jnp.float32)
    gram = matmul(x, jnp.swapaxes(x, -1, -2))
    scale, gram = normalized_gram(gram, normalization, safety, eps)
    x = x * scale
    for i, (a, b, c) in enumerate(coefficients):
        if i > 0:
            gram = matmul(x, jnp.swapaxes(x, -1, -2))
        x = a * x + matmul(b * gram + c * matmul(gram, gram), x)
    x = jnp.swapaxes(x, -1, -2) if tall else x
    return x.astype(g.dtype)


def gram_newton_schulz(g: jax.Array, coefficients: Sequence[Coefficients], *,
                       safety: float = 1.0, eps: float = 1e-7, compute_dtype=None,
                       normalization: str = "frobenius") -> jax.Array:
    """The same map as `newton_schulz`, iterated on the m × m Gram matrix alone.

    Every step's quintic is P(A) X with P(A) = aI + bA + cA², a polynomial in A = XXᵀ, so
    X_k = Q_k X_0 with Q_k = P_k Q_{k-1} and A_k = P_k² A_{k-1}. For an m × n input with n ≫ m
    this costs 2m²n + (4k − 3)m³ multiply-adds against k(2m²n + m³) for the direct form.
    """
    x0, tall = short_side_first(g)
    matmul = matmul_in(compute_dtype or jnp.float32)
    gram = matmul(x0, jnp.swapaxes(x0, -1, -2))
    scale, gram = normalized_gram(gram, normalization, safety, eps)
    eye = jnp.eye(gram.shape[-1], dtype=jnp.float32)
    q = None
    for i, (a, b, c) in enumerate(coefficients):
        p = a * eye + b * gram + c * matmul(gram, gram)
        q = p if q is None else matmul(p, q)
        if i + 1 < len(coefficients):
            gram = matmul(p, matmul(p, gram))
    x = matmul(q, x0) * scale
    x = jnp.swapaxes(x, -1, -2) if tall else x
    return x.astype(g.dtype)


def xla_newton_schulz(g: jax.Array, coefficients: Sequence[Coefficients], *, method: str = "auto",
                      **kwargs) -> jax.Array:
    """Direct or Gram iteration; `auto` takes Gram for float32 operands at aspect ≥ 2."""
    if method not in METHODS:
        raise ValueError(f"orthogonalize.method={method!r}: expected one of {list(METHODS)}")
    if method == "auto":
        short, long = sorted(g.shape[-2:])
        low_precision = kwargs.get("compute_dtype") not in (None, jnp.float32)
        # bf16 Gram products lose the small singular values; the direct form re-forms them
        method = "gram" if long >= GRAM_MIN_ASPECT * short and not low_precision else "direct"
    iterate = gram_newton_schulz if method == "gram" else newton_schulz
    return iterate(g, coefficients, **kwargs)


def _pallas_newton_schulz(g: jax.Array, coefficients: Sequence[Coefficients], **kwargs):
    from optim.kernels import pallas_newton_schulz  # Pallas loads only when asked for

    return pallas_newton_schulz(g, coefficients, **kwargs)


BACKENDS: dict[str, Callable[..., jax.Array]] = {"xla": xla_newton_schulz,
                                                 "pallas": _pallas_newton_schulz}
NSBackend = Literal["auto", "xla", "pallas"]  # optim.ns_backend: auto, or one of BACKENDS
BACKEND_CHOICES = get_args(NSBackend)


def resolve_backend(name: str) -> str:
    """`auto` is `pallas` on a platform where the kernels were verified compiled, else `xla`."""
    if name == "auto":
        from optim.kernels.compat import platform
        from optim.kernels.platforms import VERIFIED_PLATFORMS

        return "pallas" if platform() in VERIFIED_PLATFORMS else "xla"
    if name not in BACKENDS:
        raise ValueError(f"orthogonalize.backend={name!r}: expected one of {list(BACKEND_CHOICES)}")
    return name


def orthogonalize(g: jax.Array, *, scheme: str = "jordan", steps: int | None = None,
                  backend: str = "auto", compute_dtype=None, normalization: str = "frobenius",
                  method: str = "auto", eps: float = 1e-7) -> jax.Array:
    """The orthogonal factor (approximately U Vᵀ of g = U Σ Vᵀ) of each matrix in `g`.

    Leading axes are a batch: stack same-shape matrices to orthogonalize them in one call.
    backend: `xla` (pure jnp), `pallas` (optim/kernels; interpreted on CPU) or `auto`.
    """
    coefficients, safety = preset(scheme, steps)
    return BACKENDS[resolve_backend(backend)](
        g, coefficients, safety=safety, eps=eps, compute_dtype=compute_dtype,
        normalization=normalization, method=method)
