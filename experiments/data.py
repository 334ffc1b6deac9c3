"""`scaling-data`: tokenizes a corpus ahead of a sweep, and says what it holds.

    scaling-data data.tokenizer=bpe data.vocab_size=4096   # the standard library, a 4096 BPE
    scaling-data data=bpe4k data.path=corpus.jsonl          # JSON Lines, each record's `text`
    scaling-data -m +experiment=lr_width_sweep data=bpe4k   # every source the sweep reads

The command line is scaling-train's (configs/config.yaml, its groups and overrides), so a sweep's
own command line prepares its data. Each distinct source is read once: tokenized text is
tokenized and cached under data.cache_dir, or its cache is found whole and reused. Printed per
source: each split's tokens, the vocabulary, tokens per byte of text, the time taken and the
cache folder. Errors are one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING

from experiments.cli import HELP_FLAGS, fail
from experiments.compose import (
    ConfigError,
    check_groups,
    distinct_sources,
    split_command,
    sweep_points,
)

if TYPE_CHECKING:
    from scaling.training.data import TokenSplits

PROG = "scaling-data"
USAGE = "usage: scaling-data [-m] [GROUP=OPTION ...] [GROUP.FIELD=VALUE ...]"
ABOUT = """\
Reads the data of the runs a scaling-train command line would start (the same overrides) and,
for tokenized text, trains the tokenizer on the training split, encodes both splits and caches
the tokens, so that the runs start from the cache. Prints each split's tokens, the vocabulary,
tokens per byte, the time taken and the cache folder."""
FIELDS = {
    "data.path": "a text file or folder, a .jsonl file, or a .npy/.bin of token ids (default: "
                 "stdlib)",
    "data.dtype": "a .bin's ids: uint16 or uint32 (default: its FILE.bin.json's, else uint16)",
    "data.tokenizer": "bytes (default), bpe, or the path of a tokenizer.json",
    "data.vocab_size": "the BPE's vocabulary, 512 to 65536 (data=bpe4k: 4096), or a token file's",
    "data.text_field": "the string field of each .jsonl record (default: text)",
    "data.cache_dir": "the token caches' folder (default: data_cache, in the working directory)",
}


def help_text() -> str:
    fields = [f"  {field:<17} {meaning}" for field, meaning in FIELDS.items()]
    return "\n".join([USAGE, "", ABOUT, "", "main fields (GROUP.FIELD=VALUE):", *fields,
                      "examples:", *(f"  {line.strip()}" for line in __doc__.splitlines()[2:5])])


def report(splits: TokenSplits, seconds: float) -> str:
    """What a source holds and where its tokens are, as printed lines."""
    total = len(splits.train) + len(splits.val)
    if splits.text_bytes is None:
        per_byte = "n/a (a file of token ids)"
    else:
        per_byte = f"{total / splits.text_bytes:.4f} ({splits.text_bytes:,} bytes of text)"
    vocab, how = f"{splits.vocab_size}", "read"
    where = "none (bytes and token files are read as they are)"
    if splits.cache is not None:
        meta = splits.cache.meta
        if meta["tokenizer"] == "bpe":
            vocab += f" (the trained BPE has {meta['tokenizer_vocab']})"
        if splits.cache.reused:
            how = "reused the whole cache (hashed the source and token files, tokenized nothing)"
        else:
            how = (f"built: tokenizer {meta['seconds']['tokenizer']:.1f} s, "
                   f"encoding {meta['seconds']['encode']:.1f} s")
        where = str(splits.cache.folder)
    return "\n".join([
        splits.description,
        f"  train        {len(splits.train):>13,} tokens",
        f"  validation   {len(splits.val):>13,} tokens",
        f"  vocabulary   {vocab}",
        f"  tokens/byte  {per_byte}",
        f"  time         {seconds:.2f} s, {how}",
        f"  cache        {where}"])


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if HELP_FLAGS & set(argv):
        print(help_text())
        return
    from scaling.training import data  # numpy; Hugging Face tokenizers once text is tokenized

    try:
        overrides, _, config_name = split_command(argv)
        check_groups(overrides)
        for cfg in distinct_sources(sweep_points(overrides, config_name), config_name):
            start = time.perf_counter()
            splits = data.load(cfg.data, cfg.train.seq_len)
            print(report(splits, time.perf_counter() - start), flush=True)
    except ConfigError as error:
        fail(PROG, error)


if __name__ == "__main__":
    main()
