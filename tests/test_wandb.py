"""Offline W&B tracking: the run's config, metrics and group land in the .wandb file, and a
resumed run keeps its id."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import wandb
from wandb.proto import wandb_internal_pb2

import scaling.data
from experiments.compose import compose, to_run_config
from scaling.train import train

BLOCK, HEADER = 32768, 7  # the .wandb file is a LevelDB-style log of protobuf Records
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> list[wandb_internal_pb2.Record]:
    """Every Record in an offline run's .wandb file (the format `wandb sync` uploads)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B transaction log"
    records, chunks, pos = [], [], HEADER
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0:
            break
        chunks.append(data[pos + HEADER:pos + HEADER + length])
        pos += HEADER + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            records.append(record)
            chunks = []
    return records


def _of_type(records, kind: str) -> list:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


def _items(updates) -> dict:
    """A history/summary/config update as {key: value}; nested keys joined with '/'."""
    return {u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in updates}


def _offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


@pytest.fixture
def offline(tiny_run, tmp_path, monkeypatch) -> list[str]:
    """Tiny-run overrides with offline W&B, its files kept under tmp_path."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    return [*tiny_run, "logging.wandb_mode=offline"]


def test_offline_run_records_config_metrics_and_group(offline):
    """An offline run stores the resolved config, every logged metric, the summary and group."""
    result = train(to_run_config(compose([*offline, "logging.group=grp-a"])))

    (offline_dir,) = _offline_runs(Path(result["run_dir"]))
    (log,) = offline_dir.glob("*.wandb")
    records = wandb_records(log)
    (run,) = _of_type(records, "run")
    assert run.run_group == "grp-a" and run.project == "scaling"
    assert run.display_name == result["name"]
    config = _items(run.config.update)
    assert config["model"]["width"] == 64 and config["optim"]["lr"] == 0.01
    assert config["train"]["steps"] == 12

    history = [_items(h.item) for h in _of_type(records, "history")]
    assert [h["_step"] for h in history] == [3, 6, 9, 12]
    assert all("train_loss" in h for h in history)
    assert [h["_step"] for h in history if "val_loss" in h] == [6, 12]
    assert history[-1]["val_loss"] == result["val_loss"]
    summary = {}
    for update in _of_type(records, "summary"):
        summary |= _items(update.update)
    assert summary["val_loss"] == result["val_loss"] and summary["diverged"] is False
    assert [e.exit_code for e in _of_type(records, "exit")] == [0]


def test_resumed_run_keeps_its_wandb_id(offline, monkeypatch):
    """After a crash, re-running the same config continues the same W&B run id."""
    cfg = to_run_config(compose(offline))
    original = scaling.data.train_batch

    def crash_at_step_10(tokens, seed, step, batch_size, seq_len):
        if step == 10:
            raise RuntimeError("simulated crash")
        return original(tokens, seed, step, batch_size, seq_len)

    monkeypatch.setattr(scaling.data, "train_batch", crash_at_step_10)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg)
    wandb.finish(exit_code=1)  # what W&B's exit hook does when the crashed process ends
    monkeypatch.setattr(scaling.data, "train_batch", original)

    result = train(cfg)

    first, second = _offline_runs(Path(result["run_dir"]))
    ids = [_of_type(wandb_records(next(d.glob("*.wandb"))), "run")[0].run_id
           for d in (first, second)]
    assert ids[0] == ids[1]
    assert ids[0] in first.name and ids[0] in second.name
    records = [wandb_records(next(d.glob("*.wandb"))) for d in (first, second)]
    assert [[e.exit_code for e in _of_type(r, "exit")] for r in records] == [[1], [0]]
    steps = [[_items(h.item)["_step"] for h in _of_type(r, "history")] for r in records]
    assert steps == [[3, 6, 9], [9, 12]]  # the resumed run re-logs from its checkpoint at 6
    assert wandb.run is None
