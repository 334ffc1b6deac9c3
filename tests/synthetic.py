"""Synthetic sweeps for the analysis and transfer tests: one run's result.json built from a
(param, width, log2 LR, seed, loss) point and written where a sweep leaves it; and the check that
a command-line tool's error is one line, exit status 2, with nothing written."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import pytest

from scaling.config import from_dict, to_dict


def run_result(param: str, width: int, log2_lr: float, seed: int, loss: float, *, steps: int = 100,
               batch: int = 8, seq_len: int = 64, depth: int = 2, base_width: int = 64,
               base_depth: int | None = None, group: str = "sweep", root: Path = Path("runs"),
               grid: tuple[float, float] | None = None, train_gap: float = 0.01,
               diverged: bool = False, multipliers: dict[str, float] | None = None,
               extra: dict[str, dict] | None = None) -> dict:
    """The result.json of one AdamW Transformer run in the sweep folder `root`: validation loss
    `loss`, training loss `loss + train_gap`, both None when `diverged`. Its config is a whole
    RunConfig with defaults filled in; `grid` is the sweep's log2 LR range, if it has one.
    `base_depth` defaults to `depth`: give it for runs of one depth sweep, which share it.
    `multipliers` sets tunable param fields (param.output_mult, ...); `extra` any other fields,
    by group ({"optim": {"name": "muonh", "adam_lr": 0.03}, "data": {...}})."""
    lr = 2.0**log2_lr
    extra = extra or {}
    tuned = "".join(f"-{k}{v:g}" for k, v in sorted((multipliers or {}).items()) if v != 1)
    tuned += "".join(f"-{k}{v}" for group in extra.values() for k, v in sorted(group.items()))
    optim = extra.get("optim", {}).get("name", "adamw")
    name = f"transformer-w{width}-d{depth}-{param}-{optim}-lr{lr:g}-s{seed}-t{steps}{tuned}"
    sweep = {} if grid is None else {"log2_lr_min": grid[0], "log2_lr_max": grid[1]}
    config = from_dict({  # validated, so it reads back as a RunConfig
        "model": {"width": width, "depth": depth, **extra.get("model", {})},
        "param": {"name": param, "base_width": base_width,
                  "base_depth": depth if base_depth is None else base_depth,
                  **(multipliers or {})},
        "optim": {"lr": lr, "warmup_steps": 10, **extra.get("optim", {})},
        **{group: values for group, values in extra.items()
           if group not in ("model", "optim")},
        "train": {"steps": steps, "batch_size": batch, "seq_len": seq_len, "seed": seed,
                  "eval_every": 50, "log_every": 10, "checkpoint_every": 50, "out_dir": str(root)},
        "logging": {"wandb_mode": "offline", "group": group, "progress": False},
        "sweep": sweep})
    params = 12 * depth * width**2
    return {"train_loss": None if diverged else loss + train_gap,
            "val_loss": None if diverged else loss, "diverged": diverged, "steps": steps,
            "tokens": steps * batch * seq_len, "params": params, "flops_per_token": 6 * params,
            "wall_seconds": 1.0, "run_dir": str(root / name), "name": name, "data": "synthetic",
            "config": to_dict(config)}


def write_results(root: Path, results: Iterable[dict]) -> None:
    """Each result to root/<its name>/result.json, one new run folder apiece."""
    for result in results:
        run_dir = root / result["name"]
        run_dir.mkdir(parents=True)
        (run_dir / "result.json").write_text(json.dumps(result))


def files_under(root: Path) -> list[Path]:
    """Every file and folder below `root`, relative to it, sorted."""
    return sorted(p.relative_to(root) for p in root.rglob("*"))


def call_main(main: Callable[[list[str]], object], argv: list[str]) -> tuple[int, str]:
    """(exit code, stdout) of a command's `main(argv)`. Hydra binds its logging to the stdout of
    the moment, so that is a buffer of the caller's own, not capsys's: capsys closes its stream
    after the test while the logging handler would still hold it."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main(argv)
        except SystemExit as exit_info:
            return exit_info.code, out.getvalue()
    return 0, out.getvalue()


def assert_one_line_cli_error(main: Callable[[list[str]], object], argv: list[str], capsys,
                              prog: str, named: Sequence[str], root: Path) -> None:
    """`main(argv)` exits with status 2, prints nothing to stdout and one stderr line
    `<prog>: error: ...` holding every word of `named`, and writes nothing under `root`."""
    before = files_under(root)

    with pytest.raises(SystemExit) as exit_info:
        main(argv)

    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.splitlines()
    assert line.startswith(f"{prog}: error: ")
    assert all(word in line for word in named), line
    assert files_under(root) == before
