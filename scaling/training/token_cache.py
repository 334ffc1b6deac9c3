"""Token caches of tokenized text on disk: one folder per source and tokenizer.

A folder holds each split's tokens as a `.npy` file (uint16 up to 65536 token ids, else uint32;
memory-mapped when read), the trained `tokenizer.json` when the BPE was trained here, and
`meta.json`: what the tokens were made from (the source, the SHA-256 of its text, the tokenizer,
the vocabulary, the split rule's version), the token counts, the time taken, and the size and
SHA-256 of every other file.

A cache is used only when meta.json parses, names the same source text, tokenizer, vocabulary
and split rule, and every file it lists has its recorded size and SHA-256; otherwise it is
rebuilt, with a one-line warning saying why. Each file is written under a temporary name in the
folder and renamed into place (os.replace); meta.json is removed before a build and written last,
so a build cut short never leaves a cache that passes for whole.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from scaling.files import atomic_open, write_json_atomic

META = "meta.json"
TOKENIZER = "tokenizer.json"
SPLITS = ("train", "val")
# what names the folder; the rest of the identity (content hashes) is checked inside it
KEY_FIELDS = ("source", "tokenizer", "vocab_size")

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TokenCache:
    folder: Path
    meta: dict
    reused: bool  # found whole on disk, not built by this call

    def tokens(self, split: str) -> np.ndarray:
        """The split's tokens, memory-mapped read-only."""
        return np.load(self.folder / f"{split}.npy", mmap_mode="r")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def folder_for(cache_dir: Path, label: str, identity: dict) -> Path:
    """`cache_dir/<label>-<hash of the source and tokenizer>`: a changed source text keeps its
    folder (and is rebuilt there), another tokenizer or vocabulary gets its own."""
    key = json.dumps({k: identity[k] for k in KEY_FIELDS}, sort_keys=True)
    return cache_dir / f"{label}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def read(folder: Path, identity: dict) -> TokenCache | None:
    """The cache in `folder` if it is whole and made from `identity`; None if there is none
    (quietly) or it cannot be used (with a warning: it is rebuilt)."""
    if not (folder / META).exists():
        return None
    try:
        meta = json.loads((folder / META).read_text())
        problem = _problem(folder, meta, identity)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        problem = f"{META} is unreadable ({type(error).__name__}: {error})"
    if problem is not None:
        log.warning("token cache %s: %s; rebuilding it", folder, problem)
        return None
    return TokenCache(folder, meta, reused=True)


def _problem(folder: Path, meta: dict, identity: dict) -> str | None:
    changed = [key for key, value in identity.items() if meta[key] != value]
    if changed:
        return f"made from another {', '.join(changed)}"
    if not {f"{split}.npy" for split in SPLITS} <= set(meta["files"]):
        return f"{META} lists no token files"
    for name, record in meta["files"].items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != record["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, not the {record['bytes']} recorded"
        if _sha256(path) != record["sha256"]:
            return f"{name} does not match its recorded SHA-256"
    return None


def write(folder: Path, identity: dict, splits: dict[str, np.ndarray], tokenizer_json: str | None,
          details: dict) -> TokenCache:
    """Writes the splits' tokens (and the trained tokenizer), then meta.json: `identity`,
    `details`, the token counts and each file's size and SHA-256."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / META).unlink(missing_ok=True)
    names = []
    for split, tokens in splits.items():
        with atomic_open(folder / f"{split}.npy", "wb") as f:
            np.save(f, tokens)
        names.append(f"{split}.npy")
    if tokenizer_json is not None:
        with atomic_open(folder / TOKENIZER) as f:
            f.write(tokenizer_json)
        names.append(TOKENIZER)
    files = {name: {"bytes": (folder / name).stat().st_size, "sha256": _sha256(folder / name)}
             for name in names}
    meta = {**identity, **details, "tokens": {split: len(t) for split, t in splits.items()},
            "files": files}
    write_json_atomic(folder / META, meta)
    return TokenCache(folder, meta, reused=False)


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
