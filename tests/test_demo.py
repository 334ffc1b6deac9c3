"""`scaling-demo`: the proxy sweep → analysis → transfer → target story end to end (shrunk to
seconds with overrides), and the verdict it prints."""

from __future__ import annotations

import json

from experiments.demo import main, verdict
from scaling.config import lr_grid
from scaling.transfer import proxy_shape

TINY = ["train.steps=6", "train.batch_size=2", "train.seq_len=16", "train.eval_every=3",
        "train.eval_batches=1", "train.log_every=3", "train.checkpoint_every=6",
        "optim.warmup_steps=2", "sweep.log2_lr_min=-8", "sweep.log2_lr_max=-6",
        "sweep.vectorize_lr=3"]


def test_demo_runs_the_whole_story(tmp_path, capsys):
    """Every proxy LR trained, plots drawn, both targets trained at their transferred LR."""
    main(["--quick", "--wandb-mode", "disabled", "--out-dir", str(tmp_path), "--target-width",
          "128", *TINY])
    out = capsys.readouterr().out
    assert "[4/4] verdict" in out
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


def _analysis(drift: dict[str, float], wider: dict[str, bool]) -> dict:
    return {
        "drift": [{"family": {"param": p}, "widths": [64, 512], "drift_octaves": d,
                   "drift_uncertainty": 0.1, "slope": -d / 3, "any_on_edge": False}
                  for p, d in drift.items()],
        "wider_is_better": [{"family": {"param": p}, "holds": w, "beyond_noise": w,
                             "noise": 0.01} for p, w in wider.items()],
    }


def _target(param: str, loss: float | None) -> dict:
    return {"diverged": loss is None, "val_loss": loss,
            "config": {"model": {"width": 512}, "optim": {"lr": 0.01}, "param": {"name": param}}}


def test_verdict_says_what_the_numbers_say():
    """Flat μP and moving SP read as transfer; the reverse does not; target losses compared."""
    good = verdict(_analysis({"mup": 0.3, "sp": 2.5}, {"mup": True, "sp": False}),
                   {"sp": _target("sp", 2.6), "mup": _target("mup", 2.4)})
    assert "stays put" in good[-2] and "moves (≥ 2 octaves) or wider gets worse" in good[-2]
    assert good[-1].endswith("beats SP's")
    assert any("0.30 ± 0.10 octaves" in line for line in good)
    bad = verdict(_analysis({"mup": 1.6, "sp": 0.5}, {"mup": True, "sp": True}),
                  {"sp": _target("sp", 2.4), "mup": _target("mup", 2.6)})
    assert "moves by more than an octave" in bad[-2] and "does not move" in bad[-2]
    assert bad[-1].endswith("does not beat SP's")
    diverged_sp = verdict(_analysis({"mup": 0.3, "sp": 2.5}, {"mup": True, "sp": True}),
                          {"sp": _target("sp", None), "mup": _target("mup", 2.4)})
    assert any("diverged" in line for line in diverged_sp)
    assert diverged_sp[-1].endswith("beats SP's")


def test_demo_grids_cover_both_parametrizations():
    """The shipped demo sweeps SP and μP over several widths on a grid of several LRs."""
    from experiments.demo import MODES, proxy_configs

    for experiment in MODES.values():
        jobs = proxy_configs(experiment, [])
        assert {c.param.name for c in jobs} == {"sp", "mup"}
        assert len({c.model.width for c in jobs}) >= 2
        assert all(len(lr_grid(c.sweep)) >= 5 for c in jobs)
