"""The files a data source is read from, and their content fingerprint: what a run's name hashes,
so that a source whose files changed trains a new run instead of finding the old one finished.

A file is hashed (SHA-256) once per process and size + mtime: the name follows the bytes, so a
copy of the data (another disk, another host) names the same run, and a touched but unchanged
file changes nothing. The standard library is named by the config alone: the interpreter fixes it.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

from scaling.config import ConfigError, DataConfig


def source_path(cfg: DataConfig) -> Path:
    """data.path, which must exist."""
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise ConfigError("data.path", cfg.path,
                          "an existing text file, directory, .jsonl, .npy or .bin file")
    return path


def source_files(path: Path) -> list[Path]:
    """The file itself, or a directory's files (hidden ones left out) in sorted order."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))


def sidecar(path: Path) -> Path:
    """A .bin file's description beside it, FILE.bin.json: {"dtype": "uint32", "vocab_size": N}."""
    return path.with_name(path.name + ".json")


def fingerprint(cfg: DataConfig) -> str | None:
    """The SHA-256 of every file a run reads (each under its path relative to data.path): the
    source's, a .bin's sidecar and a tokenizer.json; None when there are none (the standard
    library read as bytes or through a BPE trained here)."""
    what = {}
    if cfg.path is not None:
        root = source_path(cfg)
        what["files"] = [[f.relative_to(root).as_posix(), _content_sha256(f)]
                         for f in source_files(root)]
        if root.suffix == ".bin" and sidecar(root).is_file():
            what["sidecar"] = _content_sha256(sidecar(root))
    if cfg.tokenizer not in ("bytes", "bpe"):
        what["tokenizer"] = _content_sha256(Path(cfg.tokenizer).expanduser())
    return hashlib.sha256(json.dumps(what).encode()).hexdigest() if what else None


def _content_sha256(path: Path) -> str:
    stat = path.stat()
    return _sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.cache
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """Size and mtime key the memo: a file written again is hashed again."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
