"""orbax checkpoints of the whole train state plus a small JSON of run bookkeeping."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from optim.trees import path_key


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
        """(step, state, meta) of the newest finished checkpoint, or None if there is none.

        A checkpoint that lacks some of the template's leaves (written before the state had
        them) is read as saved and those leaves start from the template's values; `template`
        None reads the checkpoint as saved."""
        step = self.manager.latest_step()
        if step is None:
            return None
        try:
            restored = self._restore(step, template)
            state = restored["state"]
        except ValueError:
            if template is None:
                raise
            restored = self._restore(step, None)
            state = _fill_from(template, restored["state"])
        return step, state, restored["meta"]

    def _restore(self, step: int, template: Any) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(template), meta=ocp.args.JsonRestore()))

    def wait(self) -> None:
        """Until every save started has been written."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        if self.manager is not None:  # closing twice is harmless
            self.wait()
            self.manager.close()
            self.manager = None


def _fill_from(template: Any, saved: Any) -> Any:
    """`template`'s structure with each leaf the saved one at the same path (by key names),
    where the checkpoint has it; a checkpoint leaf the template lacks is an error."""
    found = {path_key(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(saved)}
    paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    keys = [path_key(path) for path, _ in paths]
    unknown = sorted(set(found) - set(keys))
    if unknown:
        raise ValueError(f"checkpoint: leaves {unknown[:3]} are not in the train state: expected "
                         "a checkpoint of this run's optimizer")
    return jax.tree_util.tree_unflatten(
        treedef, [found.get(key, leaf) for key, (_, leaf) in zip(keys, paths, strict=True)])
