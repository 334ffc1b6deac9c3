"""`scaling-demo`: the proxy sweep → analysis → transfer → target story end to end (shrunk to
seconds with overrides), across width and across depth, and the verdict it prints."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
from synthetic import assert_one_line_cli_error, run_result, write_results
from tqdm.auto import tqdm

import experiments.analyze
from experiments.demo import MOVES, STAYS_PUT, STORIES, main, proxy_configs, verdict
from scaling.config import lr_grid, to_dict
from scaling.transfer import proxy_shape

TINY = ["train.steps=6", "train.batch_size=2", "train.seq_len=16", "train.eval_every=3",
        "train.eval_batches=1", "train.log_every=3", "train.checkpoint_every=6",
        "optim.warmup_steps=2", "sweep.log2_lr_min=-8", "sweep.log2_lr_max=-6",
        "sweep.vectorize_lr=3", "logging.spectral_every=0", "logging.indicators=false"]


def test_demo_runs_the_whole_story(tmp_path, capsys):
    """Every proxy LR trained, plots drawn, both targets trained at their transferred LR."""
    main(["--quick", "--wandb-mode", "disabled", "--out-dir", str(tmp_path), "--target-width",
          "128", *TINY, "model.depth=1"])  # one block: the story, at half the compile time
    captured = capsys.readouterr()
    assert "[4/4] verdict" in captured.out
    assert "\x1b[" not in captured.err  # stderr is not a terminal here: plain progress lines
    assert (tmp_path / "proxy" / "analysis" / "runs.csv").is_file()
    proxy = sorted((tmp_path / "proxy").glob("*/result.json"))
    # demo_quick: sp,mup × widths 32,64 × seed 0, over a 3-point grid
    assert len(proxy) == 2 * 2 * 3
    analysis = json.loads((tmp_path / "proxy" / "analysis" / "analysis.json").read_text())
    assert (tmp_path / "proxy" / "analysis" / "loss_vs_lr.png").stat().st_size > 10_000
    summary = json.loads((tmp_path / "verdict.json").read_text())
    for param in ("sp", "mup"):
        target = summary["targets"][param]
        assert target["config"]["model"]["width"] == 128
        assert target["config"]["param"]["name"] == param
        # same tokens and batch: the transferred base LR is the chosen proxy's fitted optimum
        shape = proxy_shape(analysis, param=param)
        assert target["config"]["optim"]["lr"] == shape["optimum"]["lr"]
        assert (tmp_path / f"transfer-{param}.yaml").read_text().count("\n- ") >= 3
    assert summary["verdict"] == verdict(analysis, summary["targets"])


def _analysis(slope: dict[str, float], wider: dict[str, bool], widths=(64, 512)) -> dict:
    """Drift whose optimum moves by `slope` octaves per width doubling over `widths`."""
    doublings = math.log2(widths[-1] / widths[0])
    return {
        "drift": [{"family": {"param": p}, "widths": list(widths),
                   "drift_octaves": abs(s) * doublings, "drift_uncertainty": 0.1, "slope": s,
                   "any_on_edge": False}
                  for p, s in slope.items()],
        "wider_is_better": [{"family": {"param": p}, "holds": w, "beyond_noise": w,
                             "noise": 0.01} for p, w in wider.items()],
    }


def _target(param: str, loss: float | None) -> dict:
    return {"diverged": loss is None, "val_loss": loss,
            "config": {"model": {"width": 512}, "optim": {"lr": 0.01}, "param": {"name": param}}}


def test_verdict_says_what_the_numbers_say():
    """Flat μP and moving SP read as transfer; the reverse does not; target losses compared."""
    good = verdict(_analysis({"mup": -0.1, "sp": -1.0}, {"mup": True, "sp": False}),
                   {"sp": _target("sp", 2.6), "mup": _target("mup", 2.4)})
    assert "stays put" in good[-2] and "moves (≥ 0.75 octave" in good[-2]
    assert good[-1].endswith("beats SP's")
    assert any("0.30 ± 0.10 octaves (slope -0.10 per width doubling)" in line for line in good)
    bad = verdict(_analysis({"mup": -0.6, "sp": -0.3}, {"mup": True, "sp": True}),
                  {"sp": _target("sp", 2.4), "mup": _target("mup", 2.6)})
    assert "moves by more than 0.5 octave" in bad[-2] and "does not move" in bad[-2]
    assert bad[-1].endswith("does not beat SP's")
    diverged_sp = verdict(_analysis({"mup": -0.1, "sp": -1.0}, {"mup": True, "sp": True}),
                          {"sp": _target("sp", None), "mup": _target("mup", 2.4)})
    assert any("diverged" in line for line in diverged_sp)
    assert diverged_sp[-1].endswith("beats SP's")
    worse_wider = verdict(_analysis({"mup": -0.1, "sp": -0.3}, {"mup": True, "sp": False}),
                          {"sp": _target("sp", 2.6), "mup": _target("mup", 2.4)})
    assert worse_wider[-2].endswith("SP's moves by less than 0.75 octave per width doubling, "
                                    "but wider gets worse at its transferred LR")


@pytest.mark.parametrize("axis", sorted(STORIES))
def test_demo_grids_cover_both_parametrizations(axis):
    """The shipped demos sweep both parametrizations (SP and μP across width, μP and CompleteP
    across depth) over several sizes of one axis only, on a grid of several LRs; the depth demo's
    shallowest proxy is its base depth, where CompleteP equals μP."""
    story = STORIES[axis]
    other = "depth" if axis == "width" else "width"
    for experiment in story.experiments.values():
        jobs = proxy_configs(experiment, [])
        assert {c.param.name for c in jobs} == {story.scaled, story.baseline}
        assert len({getattr(c.model, axis) for c in jobs}) >= 2
        assert len({getattr(c.model, other) for c in jobs}) == 1
        assert all(len(lr_grid(c.sweep)) >= 5 for c in jobs)
        if axis == "depth":
            assert {c.param.base_depth for c in jobs} == {min(c.model.depth for c in jobs)}


@pytest.mark.parametrize("widths, slope", [((32, 64), {"mup": -0.29, "sp": -1.47}),
                                           ((32, 512), {"mup": -0.3, "sp": -1.0})])
def test_verdict_judges_drift_per_width_doubling(widths, slope):
    """One doubling (--quick) or four: SP's octave-per-doubling drift moves, μP's 0.3 stays put,
    whatever the total drift in octaves."""
    lines = verdict(_analysis(slope, {"mup": True, "sp": True}, widths),
                    {"sp": _target("sp", 2.5), "mup": _target("mup", 2.4)})
    assert lines[-2] == (f"μP's optimum stays put (≤ {STAYS_PUT} octave per width doubling); "
                         f"SP's moves (≥ {MOVES} octave per width doubling)")


def _vertex(cfg) -> float:
    """SP's optimum halves per width doubling and μP's per depth doubling (neither has a rule for
    that axis); μP's across width and CompleteP's across depth stay put."""
    if cfg.param.name == "sp":
        return -6.0 - math.log2(cfg.model.width / 32)
    if cfg.param.name == "mup":
        return -6.0 - math.log2(cfg.model.depth / cfg.param.base_depth)
    return -7.0


def _stand_in_sweep(cfg) -> list[dict]:
    """What a proxy job leaves (optima at _vertex), with the progress bar the training loop draws
    for it."""
    lrs = lr_grid(cfg.sweep)
    bar = tqdm(total=len(lrs), disable=not cfg.logging.progress)  # as scaling/training/loop.py
    vertex = _vertex(cfg)
    results = []
    for log2_lr in map(math.log2, lrs):
        loss = 2.0 + 8 / cfg.model.width + 0.05 * (log2_lr - vertex) ** 2
        results.append(run_result(
            cfg.param.name, cfg.model.width, log2_lr, cfg.train.seed, loss, steps=cfg.train.steps,
            batch=cfg.train.batch_size, seq_len=cfg.train.seq_len, depth=cfg.model.depth,
            base_width=cfg.param.base_width, base_depth=cfg.param.base_depth,
            group=cfg.logging.group,
            root=Path(cfg.train.out_dir)))
        bar.update()
    bar.close()
    write_results(Path(cfg.train.out_dir), results)
    return results


def _stand_in_train(cfg) -> dict:
    loss = {"sp": 2.1, "mup": 2.0, "completep": 1.9}[cfg.param.name]
    return {"diverged": False, "val_loss": loss, "config": to_dict(cfg)}


def _stand_in_demo(out_dir: Path, argv: list[str]) -> tuple[Path, str, str]:
    """`scaling-demo --quick ARGV` around stand-in training, its stderr a file (not a terminal):
    (out dir, stdout, stderr)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("scaling.training.loop.train_sweep", _stand_in_sweep)
        patch.setattr("scaling.training.loop.train", _stand_in_train)
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            main(["--quick", "--wandb-mode", "disabled", "--out-dir", str(out_dir), *argv])
    return out_dir, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="module")
def stand_in_demo(tmp_path_factory) -> tuple[Path, str, str]:
    return _stand_in_demo(tmp_path_factory.mktemp("demo"), ["--target-width", "128"])


@pytest.fixture(scope="module")
def stand_in_depth_demo(tmp_path_factory) -> tuple[Path, str, str]:
    return _stand_in_demo(tmp_path_factory.mktemp("demo_depth"), ["--axis", "depth"])


def test_quick_demo_verdict_sees_sp_move_over_one_doubling(stand_in_demo):
    """Widths 32→64: SP's optimum moves one octave, far short of 2 octaves, yet it moves."""
    out_dir, stdout, _ = stand_in_demo
    (sp_drift,) = [line for line in stdout.splitlines() if line.startswith("  sp: optimum drift")]
    assert "1.00 ± ? octaves (slope -1.00 per width doubling)" in sp_drift
    assert "SP's moves (≥ 0.75 octave per width doubling)" in stdout
    assert json.loads((out_dir / "verdict.json").read_text())["verdict"][-2].startswith(
        "μP's optimum stays put")


def test_demo_writes_the_analysis_files_scaling_analyze_writes(stand_in_demo, tmp_path, capsys):
    out_dir, _, _ = stand_in_demo
    demo_files = out_dir / "proxy" / "analysis"
    experiments.analyze.main([str(out_dir / "proxy"), "--out", str(tmp_path),
                              "--wandb-mode", "disabled"])
    names = sorted(p.name for p in demo_files.iterdir())
    assert names == sorted(p.name for p in tmp_path.iterdir())
    assert "runs.csv" in names
    for name in ("analysis.json", "runs.csv"):
        assert (demo_files / name).read_bytes() == (tmp_path / name).read_bytes(), name


def test_progress_to_a_file_is_plain_lines(stand_in_demo):
    """No cursor-moving escape codes from nested bars: one line per proxy job instead."""
    _, _, stderr = stand_in_demo
    assert "\x1b[" not in stderr and "\r" not in stderr
    jobs = [line for line in stderr.splitlines() if line.startswith("proxy job ")]
    assert [line.split(" done")[0] for line in jobs] == [f"proxy job {i}/4" for i in (1, 2, 3, 4)]


def test_quick_depth_demo_sees_mup_move_and_completep_stay(stand_in_depth_demo):
    """Depths 1→4 under μP and CompleteP, target 4× the deepest: μP's optimum moves an octave per
    doubling, CompleteP's stays; each target keeps its proxy's width and fitted base LR (no depth
    law)."""
    out_dir, stdout, stderr = stand_in_depth_demo
    assert "[1/4] proxy sweep: 6 jobs (param × depth × seed)" in stdout
    assert "[3/4] transfer to depth 16 and train the targets" in stdout
    assert ("      mup: optimum drift over depths 1→4: 2.00 ± ? octaves (slope -1.00 per depth "
            "doubling)") in stdout
    assert "completep: optimum drift over depths 1→4: 0.00 ± ? octaves" in stdout
    assert "depth 4 → 16 blocks (r = 4 → 16 over base depth 1, α = 1)" in stdout
    summary = json.loads((out_dir / "verdict.json").read_text())
    assert summary["axis"] == "depth" and "depth_drift" in summary and "drift" not in summary
    assert summary["verdict"][-2:] == [
        ("CompleteP's optimum stays put (≤ 0.5 octave per depth doubling); μP's moves (≥ 0.75 "
         "octave per depth doubling)"),
        "at the target depth, CompleteP's transferred LR beats μP's"]
    analysis = json.loads((out_dir / "proxy" / "analysis" / "analysis.json").read_text())
    for param in ("mup", "completep"):
        target = summary["targets"][param]["config"]
        assert (target["model"]["depth"], target["model"]["width"]) == (16, 64)
        assert target["optim"]["lr"] == proxy_shape(analysis, param=param)["optimum"]["lr"]
        assert (out_dir / f"transfer-{param}.yaml").is_file()
    for plot in ("optimum_vs_depth.png", "loss_vs_lr_by_depth.png"):
        assert (out_dir / "proxy" / "analysis" / plot).is_file(), plot
    assert "proxy job 6/6 done: completep w64 d4 seed 0" in stderr


def test_target_size_of_the_other_axis_is_refused(tmp_path, capsys):
    assert_one_line_cli_error(main, ["--axis", "depth", "--target-width", "128",
                                     "--out-dir", str(tmp_path)],
                              capsys, "scaling-demo", ["--target-width=128", "--axis depth"],
                              tmp_path)


@pytest.mark.slow
def test_depth_demo_trains_the_whole_story(tmp_path, capsys):
    """Every proxy LR trained under μP and CompleteP at depths 1, 2 and 4, both targets at depth 4
    (slow: about 30 s; the stand-in depth demo above runs the same flow in the default suite,
    and the width demo's real run the same training calls)."""
    main(["--axis", "depth", "--quick", "--wandb-mode", "disabled", "--out-dir", str(tmp_path),
          "--target-depth", "4", *TINY])
    assert "[4/4] verdict" in capsys.readouterr().out
    assert len(sorted((tmp_path / "proxy").glob("*/result.json"))) == 2 * 3 * 3
    summary = json.loads((tmp_path / "verdict.json").read_text())
    for param in ("mup", "completep"):
        assert summary["targets"][param]["config"]["model"]["depth"] == 4
        assert math.isfinite(summary["targets"][param]["val_loss"])
