"""Tokenized text: the BPE trained on the training split alone, a user's tokenizer.json, JSON
Lines, the token cache (reused, rebuilt when stale or damaged) and `scaling-data`. Corpora are
a few tens of KiB written to tmp_path; the one test on the standard library reads its bytes."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import random
import sys
from pathlib import Path

import numpy as np
import pytest
from synthetic import assert_one_line_cli_error, call_main

import experiments.data
from scaling.config import ConfigError, DataConfig, RunConfig, validate
from scaling.training import data, tokens
from scaling.training.rundir import run_name

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "lambda", "café", "naïve"]
HELD_OUT_WORD = "zyzzyva"  # written where only validation text can be


def _lines(count: int, seed: int, extra: str = "") -> str:
    rng = random.Random(seed)
    return "".join(" ".join(rng.choice(WORDS) for _ in range(10)) + extra + "\n"
                   for _ in range(count))


def _corpus(tmp_path: Path, text: str, name: str = "corpus.txt") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _bpe(path: Path, tmp_path: Path, **fields) -> DataConfig:
    return DataConfig(path=str(path), tokenizer="bpe", vocab_size=512,
                      cache_dir=str(tmp_path / "cache"), **fields)


def _refuse_tokenizing(monkeypatch) -> None:
    """Training, encoding, and even importing Hugging Face tokenizers fail from here on (as on
    the GPU machine's image, which lacks the package)."""
    def refuse(*args, **kwargs):
        raise AssertionError("tokenized where nothing should be")

    monkeypatch.setattr(data, "train_bpe", refuse)
    monkeypatch.setattr(data, "encode", refuse)
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # `import tokenizers` fails


def test_a_second_load_reuses_the_cache_without_tokenizing(tmp_path, monkeypatch):
    cfg = _bpe(_corpus(tmp_path, _lines(1500, seed=0)), tmp_path)
    built = data.load(cfg, seq_len=16)
    assert not built.cache.reused and built.cache.folder.parent == tmp_path / "cache"
    assert {p.name for p in built.cache.folder.iterdir()} == {
        "train.npy", "val.npy", "tokenizer.json", "meta.json"}
    meta = built.cache.meta
    assert meta["tokens"] == {"train": len(built.train), "val": len(built.val)}
    assert meta["vocab_size"] == 512 and meta["dtype"] == "uint16" and meta["split_rule"] == 1

    _refuse_tokenizing(monkeypatch)
    reused = data.load(cfg, seq_len=16)
    assert reused.cache.reused and reused.cache.folder == built.cache.folder
    assert isinstance(reused.train, np.memmap) and not reused.train.flags.writeable
    np.testing.assert_array_equal(reused.train, built.train)
    np.testing.assert_array_equal(reused.val, built.val)
    assert reused.vocab_size == 512 and reused.train.dtype == np.uint16


def test_a_changed_source_is_tokenized_again(tmp_path):
    path = _corpus(tmp_path, _lines(1500, seed=0))
    first = data.load(_bpe(path, tmp_path), seq_len=16)
    path.write_text(_lines(1500, seed=1))
    second = data.load(_bpe(path, tmp_path), seq_len=16)
    assert not second.cache.reused and second.cache.folder == first.cache.folder
    assert second.cache.meta["source_sha256"] != first.cache.meta["source_sha256"]
    assert not np.array_equal(second.train[:1000], first.train[:1000])
    # another vocabulary is another cache, beside the first
    third = data.load(dataclasses.replace(_bpe(path, tmp_path), vocab_size=600), seq_len=16)
    assert third.cache.folder != second.cache.folder and not third.cache.reused


def _truncate(folder: Path) -> None:
    path = folder / "train.npy"
    path.write_bytes(path.read_bytes()[:-10])


def _flip_a_byte(folder: Path) -> None:  # same size: only the checksum tells
    path = folder / "val.npy"
    payload = bytearray(path.read_bytes())
    payload[-1] ^= 0xFF
    path.write_bytes(bytes(payload))


DAMAGE = {
    "truncated": (_truncate, "train.npy has"),
    "checksum": (_flip_a_byte, "val.npy does not match its recorded SHA-256"),
    "bad_json": (lambda folder: (folder / "meta.json").write_text('{"tokens": '), "unreadable"),
    "missing_file": (lambda folder: (folder / "val.npy").unlink(), "val.npy is missing"),
    "other_split_rule": (lambda folder: (folder / "meta.json").write_text(json.dumps(
        {**json.loads((folder / "meta.json").read_text()), "split_rule": 0})),
        "made from another split_rule"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_cache_is_refused_and_rebuilt(damage, tmp_path, caplog):
    """A cache whose files or metadata do not check out is never used: one warning line says
    why, and the tokens are rebuilt (the same tokens: training is deterministic)."""
    cfg = _bpe(_corpus(tmp_path, _lines(1500, seed=0)), tmp_path)
    built = data.load(cfg, seq_len=16)
    train, val = np.array(built.train), np.array(built.val)
    harm, reason = DAMAGE[damage]
    harm(built.cache.folder)

    with caplog.at_level(logging.WARNING, logger="scaling.training.token_cache"):
        rebuilt = data.load(cfg, seq_len=16)

    (record,) = caplog.records
    assert record.levelno == logging.WARNING and "\n" not in record.getMessage()
    assert str(built.cache.folder) in record.getMessage() and reason in record.getMessage()
    assert not rebuilt.cache.reused
    np.testing.assert_array_equal(rebuilt.train, train)
    np.testing.assert_array_equal(rebuilt.val, val)
    assert data.load(cfg, seq_len=16).cache.reused


def test_the_tokenizer_never_sees_validation_text(tmp_path):
    """A word written only where the validation split lies never becomes a token, though the
    same word, written where training text lies, does; validation decodes to its own text."""
    from tokenizers import Tokenizer

    text = _lines(1800, seed=0) + _lines(40, seed=1, extra=f" {HELD_OUT_WORD}" * 4)
    _, val_ranges = data.text_split(np.frombuffer(text.encode(), np.uint8))
    assert text.encode().index(HELD_OUT_WORD.encode()) >= val_ranges[0][0]  # all held out
    splits = data.load(_bpe(_corpus(tmp_path, text), tmp_path), seq_len=16)
    tokenizer = Tokenizer.from_file(str(splits.cache.folder / "tokenizer.json"))
    assert not [t for t in tokenizer.get_vocab() if "zyz" in t or "yva" in t]
    (held_out,) = val_ranges
    assert tokenizer.decode(splits.val.tolist()) == text.encode()[held_out[0]:].decode()

    swapped = _lines(40, seed=1, extra=f" {HELD_OUT_WORD}" * 4) + _lines(1800, seed=0)
    control = data.load(_bpe(_corpus(tmp_path, swapped, "control.txt"), tmp_path), seq_len=16)
    vocab = Tokenizer.from_file(str(control.cache.folder / "tokenizer.json")).get_vocab()
    assert f"Ġ{HELD_OUT_WORD}" in vocab


def test_text_is_split_at_line_starts_by_the_block_rule():
    """Tokenized text's split: the bytes' block rule (every 20th 64 KiB block held out), each cut
    moved to the next line start, or past a longer line to the next character start."""
    line = "é" * 99 + "\n"  # 199 bytes: a cut at a block boundary falls inside a line
    text = np.frombuffer((line * 14_000).encode(), np.uint8)  # 2.8 MB: 42 blocks
    train, val = data.text_split(text)
    blocks = sorted(train + val)
    assert blocks[0][0] == 0 and blocks[-1][1] == len(text)
    assert all(end == start for (_, end), (start, _) in itertools.pairwise(blocks))
    assert all(text[a - 1] == ord("\n") for a, _ in blocks[1:])
    assert [blocks.index(b) for b in val] == [19, 39]
    assert all(abs(a - 19 * data.VAL_BLOCK) < 200 or abs(a - 39 * data.VAL_BLOCK) < 200
               for a, _ in val)

    one_line = np.frombuffer(("é" * 40_000).encode(), np.uint8)  # no newline: character starts
    train, val = data.text_split(one_line)
    assert val == [(76_000, 80_000)] and train[-1][1] == 76_000
    assert all(not 0x80 <= one_line[a] < 0xC0 for a, _ in train + val)


def test_a_users_tokenizer_json(tmp_path, monkeypatch):
    """data.tokenizer=PATH: its vocabulary is the model's, read from the JSON without the
    tokenizer library; the text is encoded with it and cached; a changed file rebuilds."""
    tokenizer = tokens.train_bpe([_lines(400, seed=5)], vocab_size=700)
    tokenizer.add_special_tokens(["<|endoftext|>"])  # an added token: the largest id
    vocab = tokenizer.get_vocab_size()
    user_file = tmp_path / "mine" / "tokenizer.json"
    user_file.parent.mkdir()
    tokenizer.save(str(user_file))
    path = _corpus(tmp_path, _lines(1500, seed=0))
    cfg = DataConfig(path=str(path), tokenizer=str(user_file), cache_dir=str(tmp_path / "c"))
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "tokenizers", None)
        assert cfg.source_vocab_size == vocab == tokenizer.token_to_id("<|endoftext|>") + 1
        validate(RunConfig(data=cfg))

    splits = data.load(cfg, seq_len=16)
    assert splits.vocab_size == vocab and int(splits.train.max()) < vocab
    assert not (splits.cache.folder / "tokenizer.json").exists()  # the user keeps their own
    full = tokenizer.decode([*splits.train.tolist(), *splits.val.tolist()])
    assert full == path.read_text()
    assert data.load(cfg, seq_len=16).cache.reused

    tokens.train_bpe([_lines(400, seed=6)], vocab_size=700).save(str(user_file))
    assert not data.load(cfg, seq_len=16).cache.reused


def test_jsonl_in_byte_and_bpe_mode(tmp_path):
    """A .jsonl file gives each record's text field followed by a newline: as bytes, and as
    BPE tokens that decode back to the same text."""
    from tokenizers import Tokenizer

    texts = [_lines(3, seed=i).strip() for i in range(600)]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    joined = "".join(t + "\n" for t in texts).encode()

    as_bytes = data.load(DataConfig(path=str(path), text_field="body"), seq_len=16)
    assert as_bytes.vocab_size == 256 and as_bytes.cache is None
    assert np.concatenate([as_bytes.train, as_bytes.val]).tobytes() == joined

    as_bpe = data.load(_bpe(path, tmp_path, text_field="body"), seq_len=16)
    tokenizer = Tokenizer.from_file(str(as_bpe.cache.folder / "tokenizer.json"))
    decoded = tokenizer.decode([*as_bpe.train.tolist(), *as_bpe.val.tolist()])
    assert decoded.encode() == joined and as_bpe.text_bytes == len(joined)
    # per byte of validation text: its tokens decode to exactly that many bytes
    val_bytes = len(tokenizer.decode(as_bpe.val.tolist()).encode())
    assert as_bpe.val_tokens_per_byte == len(as_bpe.val) / val_bytes < 1
    assert as_bytes.val_tokens_per_byte == 1.0


def test_byte_mode_reads_the_standard_library_as_before(monkeypatch):
    """The default corpus, as bytes, is the stdlib files' bytes split by 64 KiB blocks, exactly
    as before tokenizers existed, without importing them and without writing a cache."""
    _refuse_tokenizing(monkeypatch)
    splits = data.load(DataConfig(), seq_len=16)
    raw = np.frombuffer(b"".join(f.read_bytes() for f in data.stdlib_files()), np.uint8)
    blocks = [raw[i:i + data.VAL_BLOCK] for i in range(0, len(raw), data.VAL_BLOCK)]
    held_out = [i % data.VAL_EVERY == data.VAL_EVERY - 1 for i in range(len(blocks))]
    np.testing.assert_array_equal(
        splits.train, np.concatenate([b for b, h in zip(blocks, held_out) if not h]))
    np.testing.assert_array_equal(
        splits.val, np.concatenate([b for b, h in zip(blocks, held_out) if h]))
    assert splits.vocab_size == 256 and splits.cache is None and splits.train.dtype == np.uint8
    assert not Path(DataConfig().cache_dir).exists()


def test_the_vocabulary_is_known_without_reading_the_data(tmp_path):
    nowhere = str(tmp_path / "not_written_yet")
    assert DataConfig(path=nowhere).source_vocab_size == 256
    assert DataConfig(path=nowhere, tokenizer="bpe", vocab_size=4096).source_vocab_size == 4096
    assert DataConfig(path=nowhere + ".bin", vocab_size=50_000).source_vocab_size == 50_000


def test_run_names_ignore_the_cache_folder_but_not_the_tokenizer():
    base = RunConfig()
    moved = RunConfig(data=DataConfig(cache_dir="/elsewhere"))
    bpe = RunConfig(data=DataConfig(tokenizer="bpe", vocab_size=4096))
    assert run_name(moved) == run_name(base) != run_name(bpe)


def _jsonl(tmp_path: Path, *lines: str) -> str:
    """The override reading a docs.jsonl of these lines."""
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return f"data.path={path}"


# each case: the overrides (given tmp_path), and the words the error line must hold
BAD_INPUTS = {
    "missing_tokenizer_file": (lambda tmp: [f"data.tokenizer={tmp / 'none.json'}"],
                               ["data.tokenizer=", "none.json", "existing tokenizer.json"]),
    "unreadable_tokenizer_file": (lambda tmp: [f"data.tokenizer={_corpus(tmp, '{}', 't.json')}"],
                                  ["data.tokenizer=", "t.json", "tokenizer.json"]),
    "vocab_below_the_alphabet": (lambda tmp: ["data.tokenizer=bpe", "data.vocab_size=300"],
                                 ["data.vocab_size=300", "512 to 65536"]),
    "vocab_beyond_uint16": (lambda tmp: ["data.tokenizer=bpe", "data.vocab_size=70000"],
                            ["data.vocab_size=70000", "512 to 65536"]),
    "empty_corpus": (lambda tmp: [f"data.path={_corpus(tmp, '', 'empty.txt')}", "data=bpe4k"],
                     ["data.path=", "empty.txt", "is empty"]),
    "jsonl_without_the_field": (
        lambda tmp: [_jsonl(tmp, '{"text": "a"}', '{"body": "b"}')],
        ["data.text_field='text'", "line 2 has no such field"]),
    "jsonl_text_not_a_string": (
        lambda tmp: [_jsonl(tmp, '{"text": 3}'), "data=bpe4k"],
        ["data.text_field='text'", "line 1 has a int"]),
    "invalid_json_line": (
        lambda tmp: [_jsonl(tmp, '{"text": "a"}', "", '{"text": ')],
        ["data.path=", "docs.jsonl", "line 3 is not valid JSON"]),
    "bpe_on_a_bin_of_tokens": (lambda tmp: [f"data.path={tmp / 't.bin'}", "data=bpe4k"],
                               ["data.tokenizer='bpe'", ".bin"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_inputs_are_one_line_naming_the_field(case, tmp_path, capsys):
    overrides, named = BAD_INPUTS[case]
    argv = [*overrides(tmp_path), f"data.cache_dir={tmp_path / 'cache'}"]
    assert_one_line_cli_error(experiments.data.main, argv, capsys, "scaling-data", named,
                              tmp_path)


def test_validate_names_the_tokenizer_field(tmp_path):
    with pytest.raises(ConfigError, match=r"^data.tokenizer='.*none.json': expected bytes, bpe"):
        validate(RunConfig(data=DataConfig(tokenizer=str(tmp_path / "none.json"))))


def test_scaling_data_prepares_and_reports(tmp_path):
    """scaling-data, in this process: builds the cache, prints each split's tokens, the
    vocabulary, tokens per byte, the time and the folder; a second call reuses the cache."""
    path = _corpus(tmp_path, _lines(1500, seed=0))
    argv = [f"data.path={path}", "data=bpe4k", "data.vocab_size=512",
            f"data.cache_dir={tmp_path / 'cache'}"]
    code, out = call_main(experiments.data.main, argv)
    assert code == 0, out
    splits = data.load(_bpe(path, tmp_path), seq_len=128)
    assert f"train        {len(splits.train):>13,} tokens" in out
    assert f"validation   {len(splits.val):>13,} tokens" in out
    ratio = (len(splits.train) + len(splits.val)) / path.stat().st_size
    assert f"tokens/byte  {ratio:.4f}" in out and "vocabulary   512 (the trained BPE has" in out
    assert "built: tokenizer" in out and str(splits.cache.folder) in out

    code, out = call_main(experiments.data.main, argv)
    assert code == 0 and "reused the whole cache" in out

    code, out = call_main(experiments.data.main, [f"data.path={path}"])
    assert code == 0 and "vocabulary   256" in out and "tokens/byte  1.0000" in out
