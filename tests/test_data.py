"""Data sources, the train/validation split and the (seed, step) -> batch contract."""

from __future__ import annotations

import sysconfig
import zlib
from pathlib import Path

import numpy as np
import pytest

from scaling.config import ConfigError, DataConfig, RunConfig, validate
from scaling.training import data
from scaling.training.rundir import run_name


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


def test_halves_split_the_top_level_packages_by_their_crc32():
    """half_a and half_b partition the corpus's files; every top-level package or module lies
    whole in the half its name's CRC-32 parity picks, and each half holds a third of the bytes
    or more."""
    root = Path(sysconfig.get_paths()["stdlib"])
    halves = {h: data.stdlib_files(h) for h in ("half_a", "half_b")}
    assert sorted(halves["half_a"] + halves["half_b"]) == sorted(data.stdlib_files())
    for half, files in halves.items():
        names = {data.top_level_name(f.relative_to(root)) for f in files}
        assert all(("half_b" if zlib.crc32(n.encode()) % 2 else "half_a") == half for n in names)
    assert data.top_level_name(Path("json/decoder.py")) == "json"
    assert data.top_level_name(Path("os.py")) == "os"
    sizes = {h: sum(f.stat().st_size for f in files) for h, files in halves.items()}
    assert min(sizes.values()) > sum(sizes.values()) / 3


def test_a_half_loads_its_own_bytes_and_says_which():
    splits = data.load(DataConfig(packages="half_b"), seq_len=16)
    expected = sum(f.stat().st_size for f in data.stdlib_files("half_b"))
    assert len(splits.train) + len(splits.val) == expected
    assert "half_b" in splits.description


def test_halves_need_the_standard_library():
    """A half of a file or folder of one's own is not defined: a one-line error."""
    with pytest.raises(ConfigError, match="data.packages='half_a': expected 'all' when data.path"):
        validate(RunConfig(data=DataConfig(path="corpus.txt", packages="half_a")))
    with pytest.raises(ConfigError, match="data.packages='half_c': expected one of"):
        validate(RunConfig(data=DataConfig(packages="half_c")))


def test_default_packages_keep_run_directories():
    """Runs finished before data.packages (and init.from_run) existed are still found: at their
    defaults the new fields leave the run-directory hash as it was. Update these names only with
    a change that means those runs must be trained again (the last: the default warmup became
    5% of train.steps, 15 steps of 300 instead of 20)."""
    assert run_name(RunConfig()) == "transformer-w128-d4-mup-adamw-lr0.01-s0-19f95111"
    half = RunConfig(data=DataConfig(packages="half_a"))
    assert run_name(half) != run_name(RunConfig())
