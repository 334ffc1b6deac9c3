"""The one place that knows how the installed jax spells Pallas compiler settings.

jax 0.10 and 0.12 both name the TPU settings `pltpu.CompilerParams` (older releases said
`TPUCompilerParams`). On GPU, plain `pallas_call` lowers through Mosaic GPU, whose kernels are
written per warpgroup; these kernels use the block model, so they ask for the Triton lowering by
passing its compiler params (deprecated in jax 0.12, still present).
"""

from __future__ import annotations

import jax
from jax.experimental.pallas import tpu as pltpu

try:
    from jax.experimental.pallas import triton as pltriton
except ImportError:  # a jax without the Triton lowering: no GPU kernels
    pltriton = None


def platform() -> str:
    """'cpu', 'gpu' or 'tpu': where the default device runs the kernels."""
    name = jax.default_backend()
    return "gpu" if name in ("cuda", "rocm", "gpu") else name


def compiler_params(target: str, dimension_semantics: tuple[str, ...]):
    """Compiler settings for a kernel lowered for `target` ('tpu', 'gpu'; None elsewhere).

    GPU warps and pipeline stages are Triton's defaults: untuned, as no GPU has run them yet.
    """
    if target == "tpu":
        params = getattr(pltpu, "CompilerParams", None) or pltpu.TPUCompilerParams
        return params(dimension_semantics=dimension_semantics)
    if target == "gpu":
        if pltriton is None:
            raise RuntimeError(f"orthogonalize.backend='pallas': jax {jax.__version__} has no "
                               "Pallas Triton lowering; use backend='xla' on this GPU")
        return pltriton.CompilerParams()
    return None


def interpret_mode(target: str, interpret):
    """What `pallas_call(interpret=...)` gets: off on accelerators, on for CPU.

    `interpret='tpu'` runs the TPU interpreter (its memory model, uninitialized memory as NaN)
    where this jax has one; True is the generic interpreter.
    """
    if interpret is None:
        return target == "cpu"
    if interpret == "tpu":
        return pltpu.InterpretParams(uninitialized_memory="nan")
    return interpret


# Device kinds the kernels are lowered for when no such device is attached (tests, CPU CI).
ABSTRACT_DEVICES = {"tpu": ("TPU v5 lite", "tpu"), "gpu": ("NVIDIA H100 80GB HBM3", "cuda")}


def lowering_platform(target: str) -> str:
    """The name `jit(...).trace(...).lower(lowering_platforms=...)` takes for `target`."""
    return ABSTRACT_DEVICES[target][1] if target in ABSTRACT_DEVICES else target


def abstract_device(target: str):
    """A context in which kernels lower for `target` without its hardware (Mosaic and Triton
    read the device kind to pick tiling rules)."""
    kind, lowering = ABSTRACT_DEVICES[target]
    device = jax.sharding.AbstractDevice(device_kind=kind, num_cores=1, platform=lowering)
    return jax.sharding.use_abstract_mesh(
        jax.sharding.AbstractMesh((1,), ("devices",), abstract_device=device))
