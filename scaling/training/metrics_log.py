"""The metrics log: append-only JSONL that stays consistent with the checkpoints."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from scaling.files import read_jsonl


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
