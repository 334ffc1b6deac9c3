"""Atomic result files and the metrics log that stays consistent with checkpoints."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_open(path: Path, mode: str = "w", **kwargs) -> Iterator[IO]:
    """A file at a temporary name in the same folder, renamed to `path` once written whole:
    readers never see half a file, and a failure leaves nothing behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, payload: Any) -> None:
    with atomic_open(path) as f:
        json.dump(payload, f, indent=2, sort_keys=True)


def read_jsonl(path: Path) -> list[dict]:
    """Complete lines only: a line cut short by a kill is dropped."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


class MetricsLog:
    """Append-only JSONL of per-step metrics, truncated on resume to the restored step."""

    def __init__(self, path: Path, keep_through_step: int, writes: bool = True):
        """`writes`: False in every process but the one that writes (several hosts): the
        records are kept in memory alike, the file is left alone."""
        self.path = path
        self.records = [r for r in read_jsonl(path) if r["step"] <= keep_through_step]
        self._file = None
        if writes:
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records))
            os.replace(tmp, path)
            self._file = open(path, "a")  # noqa: SIM115 (kept open for the whole run)

    def write(self, record: dict) -> None:
        self.records.append(record)
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def last(self, key: str) -> Any:
        return next((r[key] for r in reversed(self.records) if key in r), None)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
