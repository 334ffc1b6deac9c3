"""`scaling-coord-check`: the coordinate check as a command (docs/rules.md: μP).

SP and μP side by side at widths 64–512 (depth 2, head dim 32, batch 4 × 32 bytes of the
standard library, AdamW at a constant LR 1e-2, 3 steps, 3 initializations averaged): on the
byte MLP, μP passes coord.check=true, SP's module outputs grow with width beyond the tolerance,
and a μP table whose hidden Adam LR lost its 1/m fails the check (exit 1). A run writes a figure
per step, the slope table (CSV, markdown) and stats.json, and logs them to an offline W&B run.
Bad values are one-line errors (exit 2) before anything is compiled. The same command on the
Transformer is tests/test_coordinate_check.py's measurement, which its tests share with the
helpers below.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
from flax import nnx
from synthetic import assert_one_line_cli_error

import experiments.coord_check
import models
import scaling.rules
import scaling.schemes
from experiments.compose import compose
from models.config import ModelConfig
from models.tagged import param_specs
from scaling.coord_check import CoordConfig, update_name

PROG = "scaling-coord-check"
# The default suite checks the two ends of the command's width range (64 and 512: an 8x range,
# so a slope is the log2 ratio of the ends over 3 doublings, the same tolerance); the command's
# full default range (64, 128, 256, 512) runs under `-m slow` (tests/test_coordinate_check.py).
WIDTHS = [64, 512]
ENDS = f"coord.widths=[{WIDTHS[0]},{WIDTHS[-1]}]"
TOLERANCE = 0.125


class Check(NamedTuple):
    code: int
    folder: Path  # the check's output folder
    report: str  # slopes.md: what the command prints at the end
    rows: list[dict]  # slopes.csv


def run_check(argv: list[str], out_dir: Path) -> Check:
    """The command in-process and its outputs; sys.argv and the root logger (which Hydra's job
    logging rebinds) restored after."""
    argv_before, root = sys.argv, logging.getLogger()
    handlers, level = root.handlers[:], root.level
    code = 0
    try:
        experiments.coord_check.main([*argv, f"coord.out_dir={out_dir}"])
    except SystemExit as exit_info:
        code = exit_info.code
    finally:
        sys.argv = argv_before
        root.handlers[:] = handlers
        root.setLevel(level)
    (folder,) = out_dir.iterdir()
    with open(folder / "slopes.csv") as f:
        rows = list(csv.DictReader(f))
    return Check(code, folder, (folder / "slopes.md").read_text(), rows)


def slopes(check: Check, param: str, *, checked: bool | None = None,
           axis: str = "width") -> dict[tuple[str, int], float]:
    """(quantity, step) -> slope of one parametrization's rows."""
    return {(r["quantity"], int(r["step"])): float(r["slope"]) for r in check.rows
            if r["param"] == param and r["axis"] == axis
            and (checked is None or (r["checked"] == "True") == checked)}


def hidden_updates(kind: str) -> list[str]:
    """The update quantity of every layer of every hidden matrix, found by its role."""
    model = nnx.eval_shape(lambda: models.create(ModelConfig(kind=kind, depth=2), 256))
    return [f"{update_name(path)}/{layer}" for path, spec in param_specs(model).items()
            if spec.role == "hidden" for layer in range(2)]


def assert_mup_passes_and_sp_is_not_flat(check: Check) -> None:
    """coord.check=true exited 0: every checked μP slope is within ±0.125; SP's module outputs
    are flat at init (the same fan-in init) and far beyond the tolerance after the steps."""
    assert check.code == 0, check.report
    mup = slopes(check, "mup", checked=True)
    assert mup and all(abs(s) <= TOLERANCE for s in mup.values()), mup
    sp = {k: s for k, s in slopes(check, "sp").items() if k in mup}  # SP is not checked
    assert set(sp) == set(mup)
    assert all(abs(s) <= TOLERANCE for (_, step), s in sp.items() if step == 0), sp
    assert max(abs(s) for (_, step), s in sp.items() if step > 0) > 4 * TOLERANCE, sp
    assert "width mup (checked): flat" in check.report
    assert "width sp (not required flat): not flat" in check.report


def assert_hidden_updates_fall_like_inverse_width(check: Check, kind: str) -> None:
    """RMS of θ_t − θ_{t−1} of every hidden matrix (found by its role), per layer: slope −1
    under μP (Adam LR η/m) at every step, 0 under SP at the first step they move (an Adam step
    then moves every entry by η); never checked."""
    names = hidden_updates(kind)
    mup = {k: s for k, s in slopes(check, "mup").items() if k[0] in names}
    assert {q for q, _ in mup} == set(names)
    assert all(abs(s + 1) < 0.1 for s in mup.values()), mup
    first = min(step for _, step in mup)
    sp = {q: s for (q, step), s in slopes(check, "sp").items() if q in names and step == first}
    assert set(sp) == set(names) and all(abs(s) < 0.01 for s in sp.values()), sp
    assert not any(k[0] in names for k in slopes(check, "mup", checked=True))


@pytest.fixture(scope="module")
def mlp(tmp_path_factory) -> Check:
    """The command's defaults (readout_init=zero) on the byte MLP, with a check across depth
    (1 and 2 blocks) as well, and an offline W&B run kept under tmp_path."""
    root = tmp_path_factory.mktemp("mlp")
    with pytest.MonkeyPatch.context() as patch:
        for name in ("DIR", "CACHE_DIR", "CONFIG_DIR", "DATA_DIR"):
            patch.setenv(f"WANDB_{name}", str(root / f"wandb_{name.lower()}"))
        return run_check(["model=mlp", "coord.check=true", "coord.depths=[1,2]", ENDS,
                          "logging.wandb_mode=offline"], root / "out")


def test_mup_passes_the_check_and_sp_is_not_flat(mlp):
    assert_mup_passes_and_sp_is_not_flat(mlp)


def test_hidden_updates_fall_like_inverse_width_under_mup(mlp):
    assert_hidden_updates_fall_like_inverse_width(mlp, "mlp")


def assert_writes_figures_tables_and_stats(check: Check, params: tuple[str, ...]) -> None:
    """width_step0..3.png, slopes.csv and slopes.md, and stats.json with every width, step and
    parametrization, each file renamed into place whole."""
    for step in range(4):
        assert (check.folder / f"width_step{step}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert check.report.splitlines()[0] == ("| width slope | " + " | ".join(
        f"{p} step {s}" for p in params for s in range(4)) + " |")
    stats = json.loads((check.folder / "stats.json").read_text())
    assert stats["coord"]["widths"] == WIDTHS and stats["config"]["model"]["depth"] == 2
    assert all(sorted(map(int, stats["stats"]["width"][p])) == WIDTHS for p in params)
    assert not list(check.folder.glob(".*.tmp"))


def test_writes_figures_tables_and_stats(mlp):
    assert_writes_figures_tables_and_stats(mlp, ("sp", "mup"))


def test_summary_names_only_the_parametrizations_that_ran(mlp):
    """sp and mup ran: the width check is μP's alone, and across depth neither claims flat."""
    assert "Checked across width, for mup: every module output's" in mlp.report
    assert "Checked nothing across depth: no parametrization that ran" in mlp.report
    assert "completep" not in mlp.report and "hyperp" not in mlp.report


def test_depth_check_compares_the_last_layer(mlp):
    """coord.depths adds a check across depth at model.width: figures, and rows named for the
    last layer ('block_out/last'); neither SP nor μP must be flat in depth."""
    for step in range(4):
        assert (mlp.folder / f"depth_step{step}.png").exists()
    depth = slopes(mlp, "mup", axis="depth")
    assert ("block_out/last", 3) in depth and not any("/0" in q for q, _ in depth)
    assert not slopes(mlp, "mup", axis="depth", checked=True)


def test_logs_figures_and_table_to_an_offline_wandb_run(mlp):
    """The figures and the slope table go to an offline W&B run in the output folder, in the
    group coord_check, named after the folder."""
    from wandb_log import finished_run_records, of_type

    (run_dir,) = (mlp.folder / "wandb").glob("offline-run-*")
    images = {p.name.split("_")[0] for p in (run_dir / "files/media/images/coord").glob("*.png")}
    assert images == {"width", "depth"}
    assert list((run_dir / "files/media/table").glob("slopes_*.table.json"))
    (run,) = of_type(finished_run_records(next(run_dir.glob("*.wandb"))), "run")
    assert run.run_group == "coord_check" and run.display_name == mlp.folder.name


def test_a_broken_mup_table_fails_the_check(tmp_path, monkeypatch, capsys):
    """μP with the hidden Adam LR's 1/m removed (SP's hidden LR on μP's init), at the ends of the
    range: the hidden outputs grow with width once the hidden weights move, and coord.check=true
    exits 1 naming them."""
    mup = scaling.schemes.SCHEMES["mup"]
    broken = dataclasses.replace(mup.width["hidden"], adam_lr=scaling.rules.ONE)
    monkeypatch.setitem(scaling.schemes.SCHEMES, "mup",
                        dataclasses.replace(mup, width={**mup.width, "hidden": broken}))
    check = run_check(["model=mlp", "coord.params=[mup]", "coord.widths=[64,512]",
                       "coord.check=true", "logging.wandb_mode=disabled"], tmp_path)

    assert check.code == 1
    assert "width mup (checked): FAIL" in check.report
    err = capsys.readouterr().err
    assert f"{PROG}: check failed" in err and "block_out" in err
    assert slopes(check, "mup")[(update_name(("layers", "w")) + "/0", 2)] == pytest.approx(
        0.0, abs=0.05)  # the update no longer falls like 1/m


@pytest.mark.parametrize(("argv", "named"), [
    (["coord.widths=[64]"], ["coord.widths=[64]", "two"]),
    (["coord.widths=null"], ["coord.widths=None", "coord.depths"]),
    (["coord.params=[sp,xp]"], ["coord.params", "xp", "mup"]),
    (["coord.tolerance=0"], ["coord.tolerance=0", "positive"]),
    (["coord.widths=[64,100]"], ["coord.widths=[64, 100]", "model.head_dim=32"]),
    (["model=mlp", "coord.params=[sp,depth_mup]"], ["coord.params", "transformer"]),
    (["coord.params=[mup,hyperp]"], ["coord.params", "readout_init", "normal"]),
    (["param=sp"], ["param", "coord.params"]),
    (["train.steps=5"], ["train.steps=5", "coord.steps=3"]),
    (["coord.require_flat=[sp,xp]"], ["coord.require_flat", "xp", "null"]),
])
def test_bad_values_are_one_line_errors(argv, named, capsys, tmp_path):
    """Field, value and expectation on one stderr line, exit 2, nothing written."""
    assert_one_line_cli_error(experiments.coord_check.main,
                              [*argv, f"coord.out_dir={tmp_path}"], capsys, PROG, named, tmp_path)


def test_config_defaults_are_the_library_defaults():
    """configs/coord_check.yaml's coord node holds CoordConfig's fields and defaults."""
    defaults = {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(CoordConfig()).items()}
    assert compose([], "coord_check")["coord"] == defaults


def test_help_names_the_command_and_its_fields(capsys):
    experiments.coord_check.main(["--help"])
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {PROG}")
    assert all(field in out for field in ("coord.widths", "coord.check", "coord.tolerance"))
