"""`scaling-analyze` on a synthetic sweep whose losses are parabolas in log2 LR with known vertices:
the files it writes, the optima it recovers, its W&B analysis run, and its one-line errors."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import matplotlib.image
import pytest
from synthetic import assert_one_line_cli_error, run_result, write_results
from wandb_log import finished_run_records, items, of_type

from experiments.analyze import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
GROUP = "sweep-a"
LOG2_LR_GRID = [-10 + 0.5 * i for i in range(13)]  # -10 ... -4 in half octaves
SEEDS = (0, 1)
BATCH, SEQ_LEN, DEPTH = 8, 64, 2
DIVERGED = ("sp", 256, -4.0, 0)  # (param, width, log2 lr, seed) of the one run that blew up


def true_log2_lr(param: str, width: int, steps: int) -> float:
    """SP's optimum halves per width doubling; μP's stays put; both fall with more tokens."""
    shift = -math.log2(width / 64) if param == "sp" else -1.0
    return -6.0 + shift - 0.5 * math.log2(steps / 100)


def _loss(param: str, width: int, steps: int, log2_lr: float, seed: int) -> float:
    """Wider is better; each seed's vertex is off by ±0.05 octave so seeds disagree a little."""
    vertex = true_log2_lr(param, width, steps) + 0.1 * (seed - 0.5)
    return 1.2 + 16 / width + 100 / steps + 0.05 * (log2_lr - vertex) ** 2


def write_sweep(root: Path, params=("sp", "mup"), widths=(64, 128, 256), steps=(100,)) -> None:
    """One run folder with a result.json per grid point, as a sweep leaves them."""
    write_results(root, [
        run_result(param, width, log2_lr, seed, _loss(param, width, n_steps, log2_lr, seed),
                   steps=n_steps, batch=BATCH, seq_len=SEQ_LEN, depth=DEPTH, group=GROUP,
                   root=root, diverged=(param, width, log2_lr, seed) == DIVERGED)
        for param in params for width in widths for n_steps in steps
        for log2_lr in LOG2_LR_GRID for seed in SEEDS])


@pytest.fixture
def sweep(tmp_path) -> Path:
    root = tmp_path / "sweep"
    write_sweep(root)
    return root


def _assert_png(path: Path) -> tuple[int, int]:
    """A decodable, non-blank PNG; returns its (height, width) in pixels."""
    assert path.read_bytes()[:8] == PNG_MAGIC, path
    pixels = matplotlib.image.imread(path)
    assert pixels.std() > 0.01, f"{path} is blank"
    return pixels.shape[:2]


def test_writes_tables_and_plots_with_recovered_optima(sweep, capsys):
    """analysis.json holds each shape's optimum and the drift; runs.csv one line per run."""
    main([str(sweep), "--wandb-mode", "disabled"])

    out = sweep / "analysis"
    pngs = ["loss_vs_compute.png", "loss_vs_lr.png", "optimum_vs_width.png"]
    assert sorted(p.name for p in out.iterdir()) == ["analysis.json", *pngs, "runs.csv"]
    analysis = json.loads((out / "analysis.json").read_text())
    assert analysis["group"] == GROUP and analysis["metric"] == "val_loss"
    assert len(analysis["runs"]) == 2 * 3 * len(LOG2_LR_GRID) * len(SEEDS)
    for shape in analysis["shapes"]:
        expected = true_log2_lr(shape["param"], shape["width"], shape["steps"])
        assert shape["optimum"]["log2_lr"] == pytest.approx(expected, abs=1e-6), shape["id"]
    drift = {d["family"]["param"]: d["drift_octaves"] for d in analysis["drift"]}
    assert drift == pytest.approx({"sp": 2.0, "mup": 0.0}, abs=1e-6)

    with open(out / "runs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(analysis["runs"])
    assert set(rows[0]) == set(analysis["runs"][0])
    (diverged,) = [r for r in rows if r["diverged"] == "True"]
    assert (diverged["param"], diverged["width"], diverged["val_loss"]) == ("sp", "256", "")

    shapes = {name: _assert_png(out / name) for name in pngs}
    height, width = shapes["loss_vs_lr.png"]
    assert width > 1.5 * height, "expected SP and μP panels side by side"
    printed = capsys.readouterr().out
    assert "drift 2.00" in printed  # format_table's summary
    assert all(f"wrote {out / name}" in printed for name in ["analysis.json", "runs.csv", *pngs])


def test_token_budgets_give_the_lr_vs_tokens_plot(tmp_path):
    """Three budgets at one width: an LR-vs-tokens law (exponent -0.5), no width-drift plot."""
    write_sweep(tmp_path / "sweep", params=("mup",), widths=(64,), steps=(100, 200, 400))
    out = tmp_path / "out"

    main([str(tmp_path / "sweep"), "--out", str(out), "--wandb-mode", "disabled"])

    (law,) = json.loads((out / "analysis.json").read_text())["lr_vs_tokens"]
    assert law["exponent"] == pytest.approx(-0.5, abs=1e-6)
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["loss_vs_compute.png", "loss_vs_lr.png", "optimum_vs_tokens.png"]
    for name in pngs:
        _assert_png(out / name)


@pytest.mark.parametrize("case", ["missing_dir", "no_results", "bad_metric"])
def test_errors_are_one_line_and_write_nothing(case, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    if case == "no_results":
        sweep.mkdir()
    if case == "bad_metric":
        write_sweep(sweep, params=("mup",), widths=(64,))
    argv, named = {
        "missing_dir": ([str(sweep)], ["sweep_dir", str(sweep), "expected"]),
        "no_results": ([str(sweep)], ["result.json", str(sweep), "expected"]),
        "bad_metric": ([str(sweep), "--metric", "accuracy"],
                       ["--metric", "accuracy", "val_loss", "train_loss"]),
    }[case]

    assert_one_line_cli_error(main, argv, capsys, "scaling-analyze", named, tmp_path)


def test_wandb_analysis_run_holds_tables_images_and_drift(sweep, tmp_path, monkeypatch, capsys):
    """An offline analysis run in the sweep's group: both tables, every plot, drift in summary."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    out = tmp_path / "out"

    main([str(sweep), "--out", str(out), "--wandb-mode", "offline"])

    (offline_dir,) = (out / "wandb").glob("offline-run-*")
    records = finished_run_records(next(offline_dir.glob("*.wandb")))
    (run,) = of_type(records, "run")
    assert (run.run_group, run.job_type, run.project) == (GROUP, "analysis", "scaling")
    assert run.display_name == f"analysis-{GROUP}"
    assert f"W&B analysis run {run.run_id} (offline)" in capsys.readouterr().out

    (history,) = [items(h.item) for h in of_type(records, "history")]
    analysis = json.loads((out / "analysis.json").read_text())
    tables = {}
    for key, rows in (("runs", analysis["runs"]), ("optima", analysis["shapes"])):
        assert history[f"{key}/_type"] == "table-file"
        tables[key] = json.loads((offline_dir / "files" / history[f"{key}/path"]).read_text())
        assert len(tables[key]["data"]) == len(rows), key
    assert {"log2_lr", "on_edge", "best_loss"} <= set(tables["optima"]["columns"])
    stems = sorted(p.stem for p in out.glob("*.png"))
    assert stems == ["loss_vs_compute", "loss_vs_lr", "optimum_vs_width"]
    assert all(history[f"{stem}/_type"] == "image-file" for stem in stems)

    summary = {}
    for update in of_type(records, "summary"):
        summary |= items(update.update)
    assert summary["drift/sp/d2"] == pytest.approx(2.0, abs=1e-6)
    assert summary["drift/mup/d2"] == pytest.approx(0.0, abs=1e-6)
    assert summary["wider_is_better/mup/d2"] is True
    assert {"loss_vs_compute_exponent/sp", "loss_vs_compute_exponent/mup"} <= set(summary)
    assert [e.exit_code for e in of_type(records, "exit")] == [0]


def _grid_vertex(param: str, width: int, depth: int) -> float:
    """μP's optimum falls an octave per depth doubling; CompleteP's stays; neither moves with
    width."""
    return -7.0 - (math.log2(depth / 2) if param == "mup" else 0.0)


def test_width_by_depth_grid_gives_depth_drift_plots_and_summary(tmp_path, capsys):
    """Widths 64, 128 × depths 2, 4 (base depth 2): depth drift per width beside width drift per
    depth, both plotted, and a W&B summary value per depth family, named by its width."""
    root = tmp_path / "sweep"
    write_results(root, [
        run_result(param, width, x, seed,
                   1.2 + 16 / width + 1 / depth + 0.05 * (x - _grid_vertex(param, width, depth)
                                                         - 0.1 * (seed - 0.5)) ** 2,
                   depth=depth, base_depth=2, group=GROUP, root=root)
        for param in ("mup", "completep") for width in (64, 128) for depth in (2, 4)
        for x in LOG2_LR_GRID for seed in SEEDS])

    main([str(root), "--wandb-mode", "disabled"])

    out = root / "analysis"
    for name in ("optimum_vs_width.png", "loss_vs_lr.png", "optimum_vs_depth.png",
                 "loss_vs_lr_by_depth.png"):
        _assert_png(out / name)
    analysis = json.loads((out / "analysis.json").read_text())
    depth_drift = {(d["family"]["param"], d["family"]["width"]): d["drift_octaves"]
                   for d in analysis["depth_drift"]}
    assert depth_drift == pytest.approx({("mup", 64): 1.0, ("mup", 128): 1.0,
                                         ("completep", 64): 0.0, ("completep", 128): 0.0},
                                        abs=1e-6)
    assert len(analysis["drift"]) == 4  # width drift per (param, depth)
    printed = capsys.readouterr().out
    assert "mup adamw w64 51200 tokens d2→d4: drift 1.00" in printed

    from scaling.training.analysis_run import _summary

    summary = _summary(analysis)
    assert summary["depth_drift/mup/w64"] == pytest.approx(1.0, abs=1e-6)
    assert summary["depth_drift/completep/w128"] == pytest.approx(0.0, abs=1e-6)
    assert summary["deeper_is_better/completep/w64"] is True
    assert summary["drift/mup/d4"] == pytest.approx(0.0, abs=1e-6)
