"""Pallas kernels for Newton–Schulz orthogonalization (backend `pallas` of optim.orthogonalize).

Compiled on GPU (Triton lowering) and TPU (Mosaic); on CPU they run in the Pallas interpreter.
This package imports only jax. Its names load on first use, so that the jnp path, which shares
`ns_math` with the kernels, does not pay for importing Pallas.
"""

import importlib

_EXPORTS = {"KERNELS": "newton_schulz", "pallas_newton_schulz": "newton_schulz",
            "tiled_newton_schulz": "newton_schulz", "VERIFIED_PLATFORMS": "platforms",
            "symmetric_gram": "symmetric"}
__all__ = ["KERNELS", "VERIFIED_PLATFORMS", "pallas_newton_schulz", "symmetric_gram",
           "tiled_newton_schulz"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'optim.kernels' has no attribute {name!r}")
    return getattr(importlib.import_module(f"optim.kernels.{_EXPORTS[name]}"), name)
