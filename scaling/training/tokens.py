"""Tokenizers for text: a byte-level BPE trained on the training split, or a user's tokenizer.json.

Hugging Face `tokenizers` is imported here alone, and only when text is tokenized: bytes, `.bin`
files and a token cache that is reused never import it (the GPU machine's image lacks it).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from scaling.config import ConfigError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

ENCODE_BATCH = 256  # texts (blocks of up to 64 KiB) encoded per call: memory stays bounded


def train_bpe(texts: list[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE (GPT-2's pre-tokenizer and 256-symbol byte alphabet, no special tokens)
    trained on `texts`: `vocab_size` tokens, or fewer when the text runs out of pairs that
    occur twice. Deterministic: the same texts give the same merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tokenizer


def read_tokenizer(path: str) -> Tokenizer:
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(Path(path).expanduser()))
    except Exception as error:  # noqa: BLE001 (the Rust side raises plain Exceptions)
        first_line = str(error).strip().splitlines()[0]
        raise ConfigError("data.tokenizer", path,
                          f"a tokenizer.json that Hugging Face tokenizers reads ({first_line})"
                          ) from None


def encode(tokenizer: Tokenizer, texts: list[str], dtype: np.dtype) -> np.ndarray:
    """The texts' token ids, concatenated in order (no special tokens added)."""
    parts = [np.zeros(0, dtype)]
    for start in range(0, len(texts), ENCODE_BATCH):
        encodings = tokenizer.encode_batch_fast(texts[start:start + ENCODE_BATCH],
                                                add_special_tokens=False)
        parts += [np.asarray(e.ids, dtype=dtype) for e in encodings]
    return np.concatenate(parts)
