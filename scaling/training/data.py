"""Token sources and batches: the batch for step i is a pure function of (seed, i).

Sources: the running interpreter's standard library (default, bytes; all of it, or one of two
halves of its top-level packages), a local text file or directory (bytes), or a pre-tokenized
`.bin` file of uint16/uint32 tokens. Every source is split into train and validation by one fixed
rule: the stream is cut into blocks of VAL_BLOCK tokens and every VAL_EVERY-th block is held out.
"""

from __future__ import annotations

import dataclasses
import os
import sysconfig
import zlib
from pathlib import Path

import numpy as np

from scaling.config import BYTE_VOCAB, ConfigError, DataConfig

EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})
VAL_BLOCK = 1 << 16
VAL_EVERY = 20


@dataclasses.dataclass(frozen=True)
class TokenSplits:
    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    description: str


def top_level_name(relative: Path) -> str:
    """The top-level package or module a stdlib file belongs to: json for json/decoder.py."""
    return relative.parts[0].removesuffix(".py")


def package_half(name: str) -> str:
    """half_a or half_b by the name's CRC-32: a module that comes or goes between Python
    versions moves no other module to the other half, as alternating sorted names would."""
    return "half_b" if zlib.crc32(name.encode()) % 2 else "half_a"


def stdlib_files(packages: str = "all") -> list[Path]:
    """The standard library's .py files in sorted order, without tests and installed packages;
    those of one half of its top-level packages and modules unless `packages` is all."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS)
        files += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    if packages != "all":
        files = [f for f in files if package_half(top_level_name(f.relative_to(root))) == packages]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _read_files(files: list[Path]) -> np.ndarray:
    return np.frombuffer(b"".join(f.read_bytes() for f in files), dtype=np.uint8)


def split(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every VAL_EVERY-th block of VAL_BLOCK tokens is validation; a short source keeps its
    last 1/VAL_EVERY for validation instead."""
    n_blocks = len(tokens) // VAL_BLOCK
    if n_blocks < VAL_EVERY:
        cut = len(tokens) - len(tokens) // VAL_EVERY
        return tokens[:cut], tokens[cut:]
    block_ids = np.arange(len(tokens)) // VAL_BLOCK
    is_val = (block_ids % VAL_EVERY) == VAL_EVERY - 1
    return tokens[~is_val], tokens[is_val]


def load(cfg: DataConfig, seq_len: int) -> TokenSplits:
    """Reads the configured source; raises ConfigError for a missing, empty or short one."""
    if cfg.path is None:
        root = sysconfig.get_paths()["stdlib"]
        which = "" if cfg.packages == "all" else f" ({cfg.packages} of its top-level packages)"
        tokens, vocab = _read_files(stdlib_files(cfg.packages)), BYTE_VOCAB
        what = f"stdlib .py at {root}{which}"
    else:
        path = Path(cfg.path).expanduser()
        if not path.exists():
            raise ConfigError("data.path", cfg.path, "an existing text file, directory or .bin")
        if path.is_file() and path.suffix == ".bin":
            tokens = np.fromfile(path, dtype=np.dtype(cfg.dtype))
            vocab, what = cfg.vocab_size, f"{cfg.dtype} tokens from {path}"
            if len(tokens) and int(tokens.max()) >= vocab:
                raise ConfigError("data.vocab_size", vocab,
                                  f"more than the largest token id {int(tokens.max())} in {path}")
        else:
            files = [path] if path.is_file() else sorted(
                p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
            tokens, vocab, what = _read_files(files), BYTE_VOCAB, f"bytes of {path}"
    if len(tokens) == 0:
        raise ConfigError("data.path", cfg.path, f"a source with data ({what} is empty)")
    train, val = split(tokens)
    need = seq_len + 1
    if len(train) < need or len(val) < need:
        raise ConfigError("data.path", cfg.path,
                          f"at least {need} tokens in both splits for train.seq_len={seq_len} "
                          f"({what}: {len(train)} train, {len(val)} validation)")
    return TokenSplits(train, val, vocab, what)


def train_batch(tokens: np.ndarray, seed: int, step: int, batch_size: int,
                seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Random windows drawn from a generator seeded by (seed, step) alone: resumable exactly."""
    rng = np.random.default_rng([seed, step])
    starts_B = rng.integers(0, len(tokens) - seq_len, size=batch_size)
    windows_BxT1 = tokens[starts_B[:, None] + np.arange(seq_len + 1)[None, :]].astype(np.int32)
    return windows_BxT1[:, :-1], windows_BxT1[:, 1:]


def val_batches(tokens: np.ndarray, n_batches: int, batch_size: int,
                seq_len: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Evenly spaced held-out windows, the same for every run on the same data and shape."""
    count = n_batches * batch_size
    starts = np.linspace(0, len(tokens) - seq_len - 1, count).astype(np.int64)
    windows = tokens[starts[:, None] + np.arange(seq_len + 1)[None, :]].astype(np.int32)
    windows = windows.reshape(n_batches, batch_size, seq_len + 1)
    return [(w[:, :-1], w[:, 1:]) for w in windows]
