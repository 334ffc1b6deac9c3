"""Files of token ids are read by their format, checked, never guessed; a run's name follows the
content of the data it reads."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from scaling.config import ConfigError, DataConfig, RunConfig, validate
from scaling.training import data
from scaling.training.rundir import config_hash

TOKENS = (np.arange(4000) * 37 % 1000).astype(np.uint32)  # 4000 ids below 1000


def _run(path, **data_fields) -> RunConfig:
    return RunConfig(data=DataConfig(path=str(path), **data_fields))


def test_a_run_name_follows_the_content_of_its_data(tmp_path):
    """Adding a file or changing one (same size) names a new run; the same content, touched or
    not, names the same run; so does a changed tokenizer.json."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_bytes(b"A" * 3000)
    before = config_hash(_run(corpus))
    assert config_hash(_run(corpus)) == before
    os.utime(corpus / "a.txt", ns=(1, 1))  # touched, not changed
    assert config_hash(_run(corpus)) == before
    (corpus / "b.txt").write_bytes(b"B" * 3000)
    added = config_hash(_run(corpus))
    (corpus / "b.txt").write_bytes(b"C" * 3000)
    changed = config_hash(_run(corpus))
    assert len({before, added, changed}) == 3
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text("{}")
    first = config_hash(_run(corpus, tokenizer=str(tokenizer)))
    tokenizer.write_text("{ }")
    assert config_hash(_run(corpus, tokenizer=str(tokenizer))) != first


def test_the_standard_library_and_an_unset_dtype_keep_their_run_names():
    """The stdlib is named by the config alone, and data.dtype=null hashes as the uint16 that
    was its default, so runs finished before both keep their directories."""
    assert config_hash(RunConfig()) == config_hash(RunConfig(data=DataConfig(dtype="uint16")))
    assert config_hash(RunConfig()) != config_hash(RunConfig(data=DataConfig(dtype="uint32")))


def test_npy_is_read_as_an_integer_token_array(tmp_path):
    path = tmp_path / "t.npy"
    np.save(path, TOKENS.astype(np.int32))
    splits = data.load(DataConfig(path=str(path), vocab_size=1000), seq_len=16)
    np.testing.assert_array_equal(np.concatenate([splits.train, splits.val]), TOKENS)
    assert splits.vocab_size == 1000 and splits.reader == ".npy int32 tokens"
    with pytest.raises(ConfigError, match="^data.vocab_size=500: expected more than the largest"):
        data.load(DataConfig(path=str(path), vocab_size=500), seq_len=16)
    for bad in (TOKENS.reshape(40, 100), TOKENS.astype(np.float32)):
        np.save(path, bad)
        with pytest.raises(ConfigError, match="^data.path=.*: expected a 1-D integer array"):
            data.load(DataConfig(path=str(path), vocab_size=1000), seq_len=16)
    with pytest.raises(ConfigError, match="^data.tokenizer='bpe': expected bytes"):
        validate(_run(path, tokenizer="bpe", vocab_size=1000))


def test_uint32_bin_is_refused_as_uint16_and_read_through_its_sidecar(tmp_path):
    """Read as the default uint16, uint32 ids give every second word 0: a one-line error. A
    sidecar FILE.bin.json gives the dtype; an explicit data.dtype must agree with it."""
    path = tmp_path / "t.bin"
    TOKENS.tofile(path)
    with pytest.raises(ConfigError, match="^data.dtype=None: expected uint32, or a sidecar t.bin"):
        data.load(DataConfig(path=str(path), vocab_size=1000), seq_len=16)
    explicit = data.load(DataConfig(path=str(path), dtype="uint32", vocab_size=1000), seq_len=16)
    assert explicit.reader == ".bin uint32 tokens (data.dtype)"
    (tmp_path / "t.bin.json").write_text(json.dumps({"dtype": "uint32", "vocab_size": 1000}))
    splits = data.load(DataConfig(path=str(path), vocab_size=1000), seq_len=16)
    np.testing.assert_array_equal(np.concatenate([splits.train, splits.val]), TOKENS)
    assert splits.reader == ".bin uint32 tokens (dtype from t.bin.json)"
    with pytest.raises(ConfigError, match="^data.dtype='uint16': expected uint32, the dtype of"):
        data.load(DataConfig(path=str(path), dtype="uint16", vocab_size=1000), seq_len=16)
    with pytest.raises(ConfigError, match="^data.vocab_size=256: expected 1000 or more"):
        data.load(DataConfig(path=str(path)), seq_len=16)


def test_a_bin_that_is_no_whole_number_of_ids_is_refused(tmp_path):
    path = tmp_path / "t.bin"
    path.write_bytes(TOKENS.astype(np.uint16).tobytes() + b"\x00")
    with pytest.raises(ConfigError, match=r"^data.path=.*: expected whole uint16 tokens \(uint16 "
                                          r"by default\): its 8,001 bytes are not a multiple of 2"):
        data.load(DataConfig(path=str(path), vocab_size=1000), seq_len=16)


def test_the_summary_names_source_reader_tokens_and_vocabulary(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"A" * 6000)
    splits = data.load(DataConfig(path=str(tmp_path)), seq_len=16)
    assert splits.summary == (f"data: {tmp_path} as bytes: 6,000 tokens (5,700 train + 300 "
                              "validation), vocabulary 256")
    path = tmp_path / "t.npy"
    np.save(path, TOKENS.astype(np.int64))
    splits = data.load(DataConfig(path=str(path), vocab_size=1000), seq_len=16)
    assert splits.summary == (f"data: {path} as .npy int64 tokens: 4,000 tokens (3,800 train + "
                              "200 validation), vocabulary 1000")
