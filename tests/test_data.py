"""Data sources, the train/validation split and the (seed, step) -> batch contract."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np
import pytest

from scaling.config import ConfigError, DataConfig
from scaling.training import data


def test_stdlib_corpus_excludes_tests_and_installed_packages():
    """The default corpus is the stdlib's .py files, sorted, without test or site-packages dirs."""
    files = data.stdlib_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    rel = [f.relative_to(root).as_posix() for f in files]
    assert len(files) > 200 and all(r.endswith(".py") for r in rel)
    assert rel == sorted(rel)
    assert not any(set(Path(r).parts) & data.EXCLUDED_DIRS for r in rel)
    assert "os.py" in rel and "json/decoder.py" in rel


def test_split_holds_out_every_twentieth_block():
    """Validation is exactly the blocks with index % 20 == 19; train is the rest, in order."""
    tokens = np.arange(data.VAL_BLOCK * 40, dtype=np.int64)
    train, val = data.split(tokens)
    assert len(val) == 2 * data.VAL_BLOCK and len(train) == 38 * data.VAL_BLOCK
    assert val[0] == 19 * data.VAL_BLOCK and val[data.VAL_BLOCK] == 39 * data.VAL_BLOCK
    # disjoint: np.isin, as np.intersect1d takes seconds on these 2.6M tokens
    assert np.all(np.diff(train) > 0) and not np.isin(val, train).any()


def test_batch_is_a_pure_function_of_seed_and_step():
    """Same (seed, step) -> same batch; another step or seed -> another batch; targets shift by 1."""
    tokens = np.arange(10_000, dtype=np.uint16)
    x1, y1 = data.train_batch(tokens, seed=3, step=7, batch_size=4, seq_len=16)
    x2, y2 = data.train_batch(tokens, seed=3, step=7, batch_size=4, seq_len=16)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    assert x1.shape == (4, 16) and x1.dtype == np.int32
    np.testing.assert_array_equal(x1[:, 1:], y1[:, :-1])
    assert not np.array_equal(x1, data.train_batch(tokens, 3, 8, 4, 16)[0])
    assert not np.array_equal(x1, data.train_batch(tokens, 4, 7, 4, 16)[0])


def test_validation_windows_are_fixed_and_cover_the_split():
    """Validation windows do not depend on any seed and span the held-out tokens."""
    tokens = np.arange(5_000, dtype=np.uint16)
    a = data.val_batches(tokens, n_batches=3, batch_size=2, seq_len=8)
    b = data.val_batches(tokens, n_batches=3, batch_size=2, seq_len=8)
    assert len(a) == 3 and all(np.array_equal(x, y) for (x, _), (y, _) in zip(a, b))
    assert a[0][0][0, 0] == 0 and a[-1][1][-1, -1] == len(tokens) - 1


def test_text_directory_and_token_file_sources(tmp_path):
    """A directory is read as bytes in sorted order; a .bin keeps its dtype and vocab size."""
    (tmp_path / "b.txt").write_bytes(b"B" * 3000)
    (tmp_path / "a.txt").write_bytes(b"A" * 3000)
    splits = data.load(DataConfig(path=str(tmp_path)), seq_len=16)
    assert splits.vocab_size == 256 and splits.train[0] == ord("A") and splits.val[-1] == ord("B")
    tokens = (np.arange(4000) * 37 % 1000).astype(np.uint16)
    tokens.tofile(tmp_path / "t.bin")
    splits = data.load(DataConfig(path=str(tmp_path / "t.bin"), vocab_size=1000), seq_len=16)
    assert splits.vocab_size == 1000 and splits.train.dtype == np.uint16
    np.testing.assert_array_equal(np.concatenate([splits.train, splits.val]), tokens)
    with pytest.raises(ConfigError, match="data.vocab_size"):
        data.load(DataConfig(path=str(tmp_path / "t.bin"), vocab_size=500), seq_len=16)
