"""Reads an offline W&B run's .wandb file back into protobuf Records, for tests to inspect."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

from wandb.proto import wandb_internal_pb2

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


def finished_run_records(path: Path, timeout: float = 30.0) -> list[wandb_internal_pb2.Record]:
    """The records once the run's `exit` record is on disk: W&B's service may still be writing
    the file for a moment after `run.finish()` returns in the client."""
    deadline = time.monotonic() + timeout
    while True:
        records = wandb_records(path)
        if of_type(records, "exit") or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def of_type(records, kind: str) -> list:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


def items(updates) -> dict:
    """A history/summary/config update as {key: value}; nested keys joined with '/'."""
    return {u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in updates}
