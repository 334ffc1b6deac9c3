"""Pre-flight: a run's compiled step against the memory of the device it runs on, so a shape that
cannot fit is refused with its numbers before anything is written, not by an allocator's
traceback minutes later."""

from __future__ import annotations

import os

import jax

from scaling.config import ConfigError, TrainConfig


def device_memory(device: jax.Device) -> int | None:
    """Bytes a program may use on `device`: the allocator's limit (GPU, TPU), the host's
    physical memory for a CPU device; None where neither is known."""
    stats = device.memory_stats()
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    if device.platform == "cpu":
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


def step_bytes(memory) -> tuple[int, int]:
    """(activations and other temporaries, state and batch) of one device's share of a
    compiled program (its memory_analysis()); a donated input is counted once."""
    held = (memory.argument_size_in_bytes + memory.output_size_in_bytes
            - memory.alias_size_in_bytes)
    return memory.temp_size_in_bytes, held


def _size(n: int) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 1e3:.1f} kB"


def check_fits(memory, device: jax.Device, train: TrainConfig) -> None:
    """Raises ConfigError when the step needs more than the device has (nothing to check when
    either is unknown)."""
    have = device_memory(device)
    if memory is None or have is None:
        return
    temporaries, held = step_bytes(memory)
    if temporaries + held <= have:
        return
    accum = f" in {train.grad_accum} micro-batches" if train.grad_accum > 1 else ""
    raise ConfigError(
        "train.seq_len", train.seq_len,
        f"a training step that fits in memory: with train.batch_size={train.batch_size}{accum} "
        f"it needs {_size(temporaries + held)} on each device ({_size(temporaries)} of "
        f"activations and temporaries, {_size(held)} of parameters, optimizer state and "
        f"batch), and {device.device_kind} {device.id} has {_size(have)}; shorten "
        "train.seq_len, lower train.batch_size or raise train.grad_accum")
