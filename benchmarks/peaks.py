"""Nominal dense bf16 FLOP/s of the accelerators the benchmarks divide by (vendor figures)."""

from __future__ import annotations

# (label, substrings of jax's device_kind, peak); first match wins. An H100 SXM reports its kind
# as "NVIDIA H100 80GB HBM3", a TPU v5e as "TPU v5 lite".
NOMINAL_BF16_PEAKS = (
    ("H100 PCIe", ("H100 PCIe",), 756e12),
    ("H100 SXM", ("H100 SXM", "H100 80GB HBM3"), 989e12),
    ("H200", ("H200",), 989e12),
    ("A100", ("A100",), 312e12),
    ("TPU v5 lite", ("TPU v5 lite",), 197e12),
    ("TPU v5p", ("TPU v5p", "TPU v5"), 459e12),
    ("TPU v6 lite", ("TPU v6 lite",), 918e12),
    ("TPU v4", ("TPU v4",), 275e12),
)


def nominal_peak(device_kind: str) -> tuple[str, float] | None:
    """(label, FLOP/s) of the first matching device kind, or None for an unknown one."""
    for label, substrings, peak in NOMINAL_BF16_PEAKS:
        if any(s in device_kind for s in substrings):
            return label, peak
    return None
