"""Per-platform facts the kernels plan with: on-chip memory, tile sizes, alignment.

A fused kernel keeps a whole matrix and its Gram products on chip, so it is used only when that
footprint fits; larger matrices go through the tiled symmetric kernels.
"""

from __future__ import annotations

import dataclasses

# Platforms where `backend='auto'` may choose the Pallas kernels: each entry must have passed
# tests/test_kernels.py compiled (not interpreted) on that hardware. None has yet.
VERIFIED_PLATFORMS: frozenset[str] = frozenset()


@dataclasses.dataclass(frozen=True)
class Platform:
    on_chip_bytes: int  # what one program may keep resident (VMEM scope / shared memory per SM)
    tile: int  # rows and columns of a Gram tile, and the reduction chunk
    align: int  # matrix sides are zero-padded to a multiple of this
    reduce_in_grid: bool  # reduction chunks as a sequential grid axis (TPU) or a loop (GPU)
    power_of_two_blocks: bool  # Triton wants every block side a power of two


PLATFORMS = {
    # TPU: 16 MiB of scoped VMEM by default (more is physical); the MXU wants 128-lane tiles.
    "tpu": Platform(on_chip_bytes=16 * 2**20, tile=256, align=128, reduce_in_grid=True,
                    power_of_two_blocks=False),
    # GPU (H100): 228 KB of shared memory per SM; Triton tiles of 64-128 feed the tensor cores.
    "gpu": Platform(on_chip_bytes=228 * 2**10, tile=64, align=16, reduce_in_grid=False,
                    power_of_two_blocks=True),
    # CPU runs the kernels in the Pallas interpreter: for tests, so small tiles.
    "cpu": Platform(on_chip_bytes=228 * 2**10, tile=32, align=8, reduce_in_grid=True,
                    power_of_two_blocks=False),
}


def platform_facts(name: str) -> Platform:
    if name not in PLATFORMS:
        raise ValueError(f"orthogonalize.backend='pallas': platform {name!r} has no kernel "
                         f"settings; expected one of {sorted(PLATFORMS)}")
    return PLATFORMS[name]


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def fused_footprint_bytes(rows: int, cols: int, operand_bytes: int) -> int:
    """On-chip bytes of the fused kernel on a padded rows × cols matrix.

    X in float32 in and out (double-buffered), X as matmul operand, and three rows × rows float32
    Gram-sized temporaries (A, A², B).
    """
    return 4 * rows * cols * 4 + rows * cols * operand_bytes + 3 * rows * rows * 4
