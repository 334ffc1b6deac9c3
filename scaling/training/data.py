"""Token sources and batches: the batch for step i is a pure function of (seed, i).

Sources: the running interpreter's standard library (default; all of it, or one of two halves of
its top-level packages), a local text file or directory (files in sorted order; a `.jsonl` file
gives the `data.text_field` string of each record, each followed by a newline), or a file of
token ids: a `.npy` integer array, or a `.bin` of raw uint16/uint32 ids whose dtype is its
sidecar's (FILE.bin.json), data.dtype's or uint16, checked against the file. Text becomes tokens
as its bytes (`data.tokenizer=bytes`, vocab 256), or through a tokenizer
(scaling/training/tokens.py): a byte-level BPE trained here (`bpe`) or a user's tokenizer.json,
with the tokens cached on disk (scaling/training/token_cache.py).

The split. Bytes and token files: the stream is cut into blocks of VAL_BLOCK tokens and every
VAL_EVERY-th block is held out for validation (a source shorter than VAL_EVERY blocks keeps its
last 1/VAL_EVERY instead). Tokenized text is split before it is tokenized, so that the tokenizer
never sees validation text: the same rule on the text's bytes, each cut moved forward to the next
line start (past a line longer than a block, to the next character start, so no UTF-8 character
is cut). The BPE is trained on the training blocks alone; each split is then encoded on its own,
block by block.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import sysconfig
import time
import zlib
from pathlib import Path

import jax
import numpy as np

from scaling.config import BYTE_VOCAB, ConfigError, DataConfig
from scaling.training import token_cache
from scaling.training.source_files import sidecar, source_files, source_path
from scaling.training.token_cache import TokenCache
from scaling.training.tokens import encode, read_tokenizer, train_bpe

EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})
VAL_BLOCK = 1 << 16
VAL_EVERY = 20
SPLIT_RULE = 1  # the version of text_split's rule, recorded in token caches
NEWLINE = ord("\n")
UTF8_CONTINUATION = (0x80, 0xC0)  # bytes 10xxxxxx continue a character
DEFAULT_DTYPE = "uint16 by default"  # a .bin's dtype with neither a sidecar nor data.dtype


@dataclasses.dataclass(frozen=True)
class TokenSplits:
    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    source: str  # what was read: the standard library or the path
    reader: str  # how it became tokens: bytes, bpe-4096 tokens, .npy int32 tokens, ...
    text_bytes: int | None = None  # the bytes of text tokenized (None for a file of tokens)
    cache: TokenCache | None = None  # where tokenized text's tokens are kept
    val_text_bytes: int | None = None  # the validation text's bytes (None for a file of tokens)

    @property
    def description(self) -> str:
        return f"{self.source} as {self.reader}"

    @property
    def summary(self) -> str:
        """One line: the source, its reader, the tokens of each split and the vocabulary."""
        total = len(self.train) + len(self.val)
        return (f"data: {self.description}: {total:,} tokens ({len(self.train):,} train + "
                f"{len(self.val):,} validation), vocabulary {self.vocab_size}")

    @property
    def val_tokens_per_byte(self) -> float | None:
        """Validation tokens per byte of validation text: × a loss per token, a loss per byte
        that compares runs on bytes and on any tokenizer."""
        return None if self.val_text_bytes is None else len(self.val) / self.val_text_bytes


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


def _read_files(files: list[Path], text_field: str) -> np.ndarray:
    return np.frombuffer(b"".join(_file_text(f, text_field) for f in files), dtype=np.uint8)


def _file_text(path: Path, text_field: str) -> bytes:
    """A file's bytes; a .jsonl file's `text_field` of each record, each followed by a newline."""
    if path.suffix != ".jsonl":
        return path.read_bytes()
    texts = []
    with path.open("rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as error:  # JSONDecodeError, or bytes that are not UTF-8
                raise ConfigError("data.path", str(path), f"a JSON object on every line: line "
                                  f"{number} is not valid JSON ({getattr(error, 'msg', error)})"
                                  ) from None
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                found = "no such field" if text is None else f"a {type(text).__name__}"
                raise ConfigError("data.text_field", text_field,
                                  f"a string field of every record of {path}: line {number} "
                                  f"has {found}")
            texts.append(text.encode("utf-8", errors="replace") + b"\n")
    return b"".join(texts)


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


def _line_start(text: np.ndarray, at: int) -> int:
    """The first position at or after `at` that starts a line; past a line longer than a
    block, the first that starts a UTF-8 character."""
    if at <= 0 or at >= len(text):
        return min(max(at, 0), len(text))
    newlines = np.flatnonzero(text[at - 1:at - 1 + VAL_BLOCK] == NEWLINE)
    if len(newlines):
        return at + int(newlines[0])
    while at < len(text) and UTF8_CONTINUATION[0] <= text[at] < UTF8_CONTINUATION[1]:
        at += 1
    return at


def text_split(text: np.ndarray) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The byte ranges (blocks) of the training and the validation text: `split`'s rule with
    every cut moved to a line start (module docstring)."""
    n = len(text)
    cuts = [_line_start(text, k * VAL_BLOCK) for k in range(1, -(-n // VAL_BLOCK))]
    blocks = list(zip([0, *cuts], [*cuts, n]))
    if n // VAL_BLOCK < VAL_EVERY:
        held = _line_start(text, n - n // VAL_EVERY)
        train, val = [(a, min(b, held)) for a, b in blocks if a < held], [(held, n)]
    else:
        train = [b for i, b in enumerate(blocks) if i % VAL_EVERY != VAL_EVERY - 1]
        val = [b for i, b in enumerate(blocks) if i % VAL_EVERY == VAL_EVERY - 1]
    return [(a, b) for a, b in train if a < b], [(a, b) for a, b in val if a < b]


def load(cfg: DataConfig, seq_len: int) -> TokenSplits:
    """Reads the configured source, tokenizing text (or finding its tokens cached) unless it
    is read as bytes; raises ConfigError for a missing, empty or short source or a bad
    tokenizer."""
    if cfg.holds_tokens:
        splits = _token_file(cfg)
    else:
        text, what = _read_text(cfg)
        if cfg.tokenizer == "bytes":
            train, val = split(text)
            splits = TokenSplits(train, val, BYTE_VOCAB, what, "bytes", text_bytes=len(text),
                                 val_text_bytes=len(val))
        else:
            splits = _tokenized(cfg, text, what)
    need = seq_len + 1
    if len(splits.train) < need or len(splits.val) < need:
        raise ConfigError("data.path", cfg.path,
                          f"at least {need} tokens in both splits for train.seq_len={seq_len} "
                          f"({splits.description}: {len(splits.train)} train, "
                          f"{len(splits.val)} validation)")
    return splits


def _token_file(cfg: DataConfig) -> TokenSplits:
    """A .npy or .bin file's token ids, memory-mapped, each below data.vocab_size."""
    path = source_path(cfg)
    if path.stat().st_size == 0:
        raise ConfigError("data.path", cfg.path, f"a source with data ({path} is empty)")
    ids, reader = _npy_tokens(cfg, path) if path.suffix == ".npy" else _bin_tokens(cfg, path)
    if len(ids) == 0:
        raise ConfigError("data.path", cfg.path, f"a source with data ({path} has no tokens)")
    if ids.dtype.kind == "i" and int(ids.min()) < 0:
        raise ConfigError("data.path", cfg.path,
                          f"token ids of 0 or more ({path} has {int(ids.min())})")
    if int(ids.max()) >= cfg.vocab_size:
        raise ConfigError("data.vocab_size", cfg.vocab_size,
                          f"more than the largest token id {int(ids.max())} in {path}")
    return TokenSplits(*split(ids), cfg.vocab_size, str(path), reader)


def _npy_tokens(cfg: DataConfig, path: Path) -> tuple[np.ndarray, str]:
    try:
        ids = np.load(path, mmap_mode="r")  # no pickled objects: allow_pickle stays False
    except (ValueError, OSError, EOFError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError("data.path", cfg.path, f"a .npy file np.load reads ({reason})") from None
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise ConfigError("data.path", cfg.path, f"a 1-D integer array of token ids in the "
                          f".npy (it holds {ids.dtype} of shape {ids.shape})")
    return ids, f".npy {ids.dtype} tokens"


def _bin_tokens(cfg: DataConfig, path: Path) -> tuple[np.ndarray, str]:
    """Raw ids of the sidecar's dtype, or data.dtype's, or uint16: a length that is no whole
    number of ids, or uint16 words every second one of which is 0, is an error (the latter is
    how little-endian uint32 ids below 65536 read as uint16)."""
    dtype, origin = _bin_dtype(cfg, path)
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise ConfigError("data.path", cfg.path, f"whole {dtype} tokens ({origin}): its {size:,} "
                          f"bytes are not a multiple of {dtype.itemsize}")
    ids = np.memmap(path, dtype=dtype, mode="r")
    if origin == DEFAULT_DTYPE and len(ids) % 2 == 0 and ids.any() and not ids[1::2].any():
        raise ConfigError("data.dtype", cfg.dtype, f"uint32, or a sidecar {sidecar(path).name}: "
                          f"read as uint16, every second word of {path} is 0, as in uint32 tokens")
    return ids, f".bin {dtype} tokens ({origin})"


def _bin_dtype(cfg: DataConfig, path: Path) -> tuple[np.dtype, str]:
    """The .bin's dtype and where it comes from; its sidecar must agree with data.dtype and
    data.vocab_size."""
    side = sidecar(path)
    if not side.is_file():
        return np.dtype(cfg.dtype or "uint16"), "data.dtype" if cfg.dtype else DEFAULT_DTYPE
    try:
        spec = json.loads(side.read_text())
    except (ValueError, OSError) as error:
        raise ConfigError("data.path", cfg.path, f"a sidecar {side} of JSON ({error})") from None
    declared = spec.get("dtype") if isinstance(spec, dict) else None
    if declared not in ("uint16", "uint32"):
        raise ConfigError("data.path", cfg.path, f'a sidecar {side} with "dtype": "uint16" or '
                          f'"uint32" (it has {declared!r})')
    if cfg.dtype is not None and cfg.dtype != declared:
        raise ConfigError("data.dtype", cfg.dtype,
                          f"{declared}, the dtype of {side}, or null to take it from there")
    vocab = spec.get("vocab_size")
    if vocab is not None and not cfg.vocab_size >= vocab:
        raise ConfigError("data.vocab_size", cfg.vocab_size,
                          f"{vocab} or more, the vocab_size of {side}")
    return np.dtype(declared), f"dtype from {side.name}"


def _read_text(cfg: DataConfig) -> tuple[np.ndarray, str]:
    """The source's text as one byte stream, and what it is (the stdlib, or the path)."""
    if cfg.path is None:
        text = _read_files(stdlib_files(cfg.packages), cfg.text_field)
        what = _stdlib_description(cfg.packages)
    else:
        path = source_path(cfg)
        text, what = _read_files(source_files(path), cfg.text_field), str(path)
    if len(text) == 0:
        raise ConfigError("data.path", cfg.path, f"a source with data ({what} is empty)")
    return text, what


def _tokenized(cfg: DataConfig, text: np.ndarray, what: str) -> TokenSplits:
    """Tokens of the text from its cache, built first if the cache is missing, stale or
    damaged."""
    bpe = cfg.tokenizer == "bpe"
    label, named = _cache_name(cfg)
    tokenizer, vocab = named["tokenizer"], named["vocab_size"]
    identity = {"split_rule": SPLIT_RULE, **named,
                "source_sha256": hashlib.sha256(text).hexdigest(), "source_bytes": len(text),
                "dtype": token_cache.token_dtype(vocab).name}
    if not bpe:  # a user's file may change under the same path
        identity["tokenizer_sha256"] = hashlib.sha256(Path(tokenizer).read_bytes()).hexdigest()
    folder = token_cache.folder_for(Path(cfg.cache_dir).expanduser(), label, identity)
    ranges = dict(zip(token_cache.SPLITS, text_split(text), strict=True))
    cache = token_cache.read(folder, identity) or _build(cfg, text, ranges, identity, folder)
    reader = f"bpe-{vocab} tokens" if bpe else f"tokens of {tokenizer}"
    return TokenSplits(cache.tokens("train"), cache.tokens("val"), vocab, what, reader,
                       text_bytes=len(text), cache=cache,
                       val_text_bytes=sum(b - a for a, b in ranges["val"]))


def _stdlib_description(packages: str) -> str:
    which = "" if packages == "all" else f" ({packages} of its top-level packages)"
    return f"stdlib .py at {sysconfig.get_paths()['stdlib']}{which}"


def _cache_name(cfg: DataConfig) -> tuple[str, dict]:
    """The label of tokenized text's cache folder and what names it (token_cache.KEY_FIELDS):
    the source, the tokenizer and the vocabulary, known without reading the text."""
    bpe = cfg.tokenizer == "bpe"
    source = (_stdlib_description(cfg.packages) if cfg.path is None
              else str(Path(cfg.path).expanduser().resolve()))
    tokenizer = "bpe" if bpe else str(Path(cfg.tokenizer).expanduser().resolve())
    vocab = cfg.source_vocab_size  # reads a user's tokenizer.json: fails if it is missing
    name = "stdlib" if cfg.path is None else Path(source).stem
    label = f"{name}-{cfg.packages}" if cfg.packages != "all" else name
    label += f"-bpe{vocab}" if bpe else f"-{Path(tokenizer).stem}"
    return label, {"source": source, "tokenizer": tokenizer, "vocab_size": vocab}


def cache_folder(cfg: DataConfig) -> Path:
    """The token cache folder of tokenized text (and of the BPE trained for it), from the config
    alone: where a finished run's tokenizer is found."""
    label, named = _cache_name(cfg)
    return token_cache.folder_for(Path(cfg.cache_dir).expanduser(), label, named)


def _build(cfg: DataConfig, text: np.ndarray, ranges: dict[str, list[tuple[int, int]]],
           identity: dict, folder: Path) -> TokenCache:
    """Trains the BPE on the training blocks of `ranges` (or reads the user's tokenizer),
    encodes each split and writes the cache."""
    texts = {name: [text[a:b].tobytes().decode("utf-8", errors="replace") for a, b in blocks]
             for name, blocks in ranges.items()}
    start = time.perf_counter()
    if cfg.tokenizer == "bpe":
        tokenizer = train_bpe(texts["train"], cfg.vocab_size)
    else:
        tokenizer = read_tokenizer(cfg.tokenizer)
    trained = time.perf_counter()
    dtype = np.dtype(identity["dtype"])
    encoded = {name: encode(tokenizer, blocks, dtype) for name, blocks in texts.items()}
    seconds = {"tokenizer": round(trained - start, 3),
               "encode": round(time.perf_counter() - trained, 3)}
    details = {"tokenizer_vocab": tokenizer.get_vocab_size(), "seconds": seconds}
    return token_cache.write(folder, identity, encoded,
                             tokenizer.to_str() if cfg.tokenizer == "bpe" else None, details)


def train_batch(tokens: np.ndarray, seed: int, step: int, batch_size: int, seq_len: int,
                rows: slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
    """Random windows drawn from a generator seeded by (seed, step) alone: resumable exactly.
    `rows`: only those rows of the batch are read (every start is still drawn, so a row is the
    same whichever rows are asked for)."""
    rng = np.random.default_rng([seed, step])
    starts_B = rng.integers(0, len(tokens) - seq_len, size=batch_size)[rows]
    windows_BxT1 = tokens[starts_B[:, None] + np.arange(seq_len + 1)[None, :]].astype(np.int32)
    return windows_BxT1[:, :-1], windows_BxT1[:, 1:]


def global_batch(tokens: np.ndarray, seed: int, step: int, batch_size: int, seq_len: int,
                 sharding: jax.sharding.Sharding) -> tuple[jax.Array, jax.Array]:
    """train_batch as two global arrays laid out by `sharding`, each process reading only the
    rows its own devices hold (from memory-mapped tokens, only those windows' pages)."""
    read = functools.cache(lambda start, stop: train_batch(
        tokens, seed, step, batch_size, seq_len, rows=slice(start, stop)))

    def part(which: int) -> jax.Array:
        def rows_of(index):
            start, stop, _ = index[0].indices(batch_size)
            return read(start, stop)[which][:, index[1]]
        return jax.make_array_from_callback((batch_size, seq_len), sharding, rows_of)

    return part(0), part(1)


def val_batches(tokens: np.ndarray, n_batches: int, batch_size: int,
                seq_len: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Evenly spaced held-out windows, the same for every run on the same data and shape."""
    count = n_batches * batch_size
    starts = np.linspace(0, len(tokens) - seq_len - 1, count).astype(np.int64)
    windows = tokens[starts[:, None] + np.arange(seq_len + 1)[None, :]].astype(np.int32)
    windows = windows.reshape(n_batches, batch_size, seq_len + 1)
    return [(w[:, :-1], w[:, 1:]) for w in windows]
