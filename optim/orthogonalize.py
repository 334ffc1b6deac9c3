"""Newton–Schulz orthogonalization: the one entry point Muon-family optimizers call.

Each step maps the singular values of X by an odd quintic p(σ) = aσ + bσ³ + cσ⁵ (computed as
A = XXᵀ, X ← aX + (bA + cA²)X on the short side), after X is scaled by its Frobenius norm so that
every σ ≤ 1. Coefficient schemes are data (PRESETS, see SCALING_RULES.md §4); backends register in
BACKENDS (`xla` is the pure-jnp reference).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

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
PRESET_NAMES = ("jordan", "polar_express", "classical")


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


def newton_schulz(g: jax.Array, coefficients: Sequence[Coefficients], *, safety: float = 1.0,
                  eps: float = 1e-7, compute_dtype=None) -> jax.Array:
    """NS over the last two axes of `g` (any leading axes are a batch), in `g`'s dtype.

    `compute_dtype` (e.g. bfloat16) sets the matmul operands; products accumulate in float32.
    """
    if g.ndim < 2:
        raise ValueError(f"orthogonalize: expected a matrix or a stack of them, got {g.shape}")
    tall = g.shape[-2] > g.shape[-1]
    x = jnp.swapaxes(g, -1, -2) if tall else g  # iterate on the short side: XXᵀ is m × m
    x = x.astype(jnp.float32)
    norm = jnp.linalg.norm(x, axis=(-2, -1), keepdims=True)
    x = x / (norm * safety + eps)
    operand = compute_dtype or jnp.float32

    def matmul(p, q):
        return jnp.matmul(p.astype(operand), q.astype(operand),
                          preferred_element_type=jnp.float32)

    for a, b, c in coefficients:
        gram = matmul(x, jnp.swapaxes(x, -1, -2))
        x = a * x + matmul(b * gram + c * matmul(gram, gram), x)
    x = jnp.swapaxes(x, -1, -2) if tall else x
    return x.astype(g.dtype)


BACKENDS: dict[str, Callable[..., jax.Array]] = {"xla": newton_schulz}


def orthogonalize(g: jax.Array, *, scheme: str = "jordan", steps: int | None = None,
                  backend: str = "xla", compute_dtype=None) -> jax.Array:
    """The orthogonal factor (approximately U Vᵀ of g = U Σ Vᵀ) of each matrix in `g`."""
    if backend not in BACKENDS:
        raise ValueError(f"orthogonalize.backend={backend!r}: expected one of {sorted(BACKENDS)}")
    coefficients, safety = preset(scheme, steps)
    return BACKENDS[backend](g, coefficients, safety=safety, compute_dtype=compute_dtype)
