"""Pallas kernels for Newton–Schulz orthogonalization (backend `pallas` of optim.orthogonalize).

Compiled on GPU (Triton lowering) and TPU (Mosaic); on CPU they run in the Pallas interpreter.
"""

from optim.kernels.newton_schulz import KERNELS, pallas_newton_schulz, tiled_newton_schulz
from optim.kernels.platforms import VERIFIED_PLATFORMS
from optim.kernels.symmetric import symmetric_gram

__all__ = ["KERNELS", "VERIFIED_PLATFORMS", "pallas_newton_schulz", "symmetric_gram",
           "tiled_newton_schulz"]
