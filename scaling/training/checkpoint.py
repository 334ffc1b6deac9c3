"""orbax checkpoints of the whole train state plus a small JSON of run bookkeeping."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: Path):
        options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True,
                                               cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(directory.absolute(), options=options)

    def save(self, step: int, state: Any, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore_latest(self, template: Any) -> tuple[int, Any, dict] | None:
        """(step, state, meta) of the newest finished checkpoint, or None if there is none."""
        step = self.manager.latest_step()
        if step is None:
            return None
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(template), meta=ocp.args.JsonRestore()))
        return step, restored["state"], restored["meta"]

    def wait(self) -> None:
        """Until every save started has been written."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        if self.manager is not None:  # closing twice is harmless
            self.wait()
            self.manager.close()
            self.manager = None
