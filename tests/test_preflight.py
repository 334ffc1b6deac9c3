"""The memory pre-flight: a compiled step's bytes against its device's, refused with the
numbers when it cannot fit."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from scaling.config import ConfigError, TrainConfig
from scaling.training.preflight import check_fits, device_memory, step_bytes


@dataclasses.dataclass
class Device:
    """A device whose allocator allows `limit` bytes (what a GPU reports)."""

    limit: int
    platform: str = "gpu"
    device_kind: str = "test accelerator"
    id: int = 3

    def memory_stats(self) -> dict:
        return {"bytes_limit": self.limit}


@pytest.fixture(scope="module")
def memory():
    """A program holding a 1024×1024 float32 temporary (4 MB) between input and output: the
    sort keeps the outer product from fusing into the sum."""
    x = jax.ShapeDtypeStruct((1024,), jnp.float32)
    outer_sorted = lambda v: jnp.sort(v[:, None] * v[None, :], axis=0).sum(0)
    return jax.jit(outer_sorted).lower(x).compile().memory_analysis()


def test_step_bytes_count_temporaries_and_state(memory):
    temporaries, held = step_bytes(memory)
    assert temporaries >= 1024 * 1024 * 4
    assert held == 2 * 1024 * 4  # the input and the output, nothing donated


def test_a_step_beyond_the_device_is_refused_with_its_numbers(memory):
    train = TrainConfig(batch_size=8, seq_len=4096, grad_accum=2)
    need = sum(step_bytes(memory))
    check_fits(memory, Device(limit=need), train)  # exactly fits
    with pytest.raises(ConfigError, match=r"train.seq_len=4096: expected a training step that "
                       r"fits in memory: with train.batch_size=8 in 2 micro-batches it needs "
                       r".* on each device .* and test accelerator 3 has 1.0 kB; shorten"):
        check_fits(memory, Device(limit=1000), train)


def test_cpu_memory_is_the_hosts():
    assert device_memory(jax.devices("cpu")[0]) > 2**30
