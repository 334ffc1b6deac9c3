"""Base-LR laws (scaling/laws.py) and joint width–depth paths: the laws' factors, `--law` in a
transfer, the joint_path overlay's shapes, and the path analysis and plots on a planted sweep."""

from __future__ import annotations

import math

import numpy as np
import pytest
from synthetic import run_result, write_results

from experiments.compose import compose, sweep_points, to_run_config
from scaling.analysis import analyze, format_table, load_results
from scaling.config import ConfigError
from scaling.laws import ARCHSCALE, DEPTH_SQRT, LAWS, TABLES, Size
from scaling.plots import _loss_vs_lr, plot_analysis
from scaling.transfer import transfer


def test_the_archscale_law_is_the_reference_formula():
    """η0·√(B/B0)·√(d0/d)·(T/T0)^−0.32: width ×4, batch ×2, tokens ×8."""
    proxy, target = Size(64, 2, 1000, 8), Size(256, 2, 8000, 16)
    expected = math.sqrt(2) * math.sqrt(64 / 256) * 8**-0.32
    assert ARCHSCALE.log2_factor(proxy, target) == pytest.approx(math.log2(expected), abs=1e-12)
    assert ARCHSCALE.factors(proxy, Size(64, 16, 1000, 8))["depth"] == 1.0  # no depth term
    assert DEPTH_SQRT.factors(proxy, Size(64, 8, 1000, 8))["depth"] == pytest.approx(0.5)
    assert TABLES.factors(proxy, Size(1024, 16, 1000, 8)) == {
        "width": 1.0, "depth": 1.0, "tokens": 1.0, "batch": 1.0}


@pytest.mark.parametrize("law, width_factor, depth_factor", [
    ("archscale", 0.5, 1.0), ("depth_sqrt", 1.0, 0.5), ("tables", 1.0, 1.0)])
def test_transfer_applies_the_chosen_law(law, width_factor, depth_factor):
    """HyperP proxy w64 d2 → w256 d8 under each law: its width and depth factors, nothing else."""
    proxy = to_run_config(compose(["param=hyperp", "model.width=64", "model.depth=2"]))
    width_only = transfer(proxy, 0.1, width=256, law=law)
    depth_only = transfer(proxy, 0.1, depth=8, law=law)
    assert width_only.lr == pytest.approx(0.1 * width_factor, rel=1e-12)
    assert depth_only.lr == pytest.approx(0.1 * depth_factor, rel=1e-12)
    assert width_only.law == LAWS[law]
    if width_factor != 1:
        (line,) = [r for r in width_only.reasons if r.startswith("width")]
        assert f"the {law} law moves the base LR: η × (w0/w)^0.5 = ×0.5" in line


def test_an_unknown_law_or_negative_exponent_names_the_field():
    proxy = to_run_config(compose(["param=hyperp"]))
    with pytest.raises(ConfigError) as error:
        transfer(proxy, 0.1, width=256, law="sqrt")
    assert error.value.field == "law" and "archscale" in str(error.value)
    with pytest.raises(ConfigError) as error:
        transfer(proxy, 0.1, width=256, law="archscale", data_exponent=-1)
    assert error.value.field == "data_exponent"


def test_the_joint_path_overlay_composes_to_its_shapes():
    points = sweep_points(["+experiment=joint_path", "param=hyperp"])
    shapes = [(c.model.width, c.model.depth, c.train.seed, c.train.steps)
              for c in (to_run_config(compose(p)) for p in points)]
    assert shapes == [(w, d, s, 100) for w, d in ((64, 2), (128, 4), (256, 8)) for s in (0, 1)]


# A path whose optimum falls half an octave per joint doubling: what √(d0/d) predicts.
PATH = ((64, 2), (128, 4), (256, 8))


@pytest.fixture(scope="module")
def path_sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("path")
    results = []
    for width, depth in PATH:
        star = -3.3 - 0.5 * math.log2(width / 64)
        for log2_lr in np.arange(-7, -0.5, 0.5):
            for seed in (0, 1):
                loss = 2.4 - 0.1 * math.log2(width / 64) + 0.04 * (log2_lr - star) ** 2
                results.append(run_result("hyperp", width, log2_lr, seed, loss + 1e-3 * seed,
                                          depth=depth, base_depth=4, root=root,
                                          extra={"optim": {"name": "muonh"}}))
    write_results(root, results)
    return root


def test_the_path_analysis_takes_out_each_law(path_sweep):
    analysis = analyze(load_results(path_sweep))
    (path,) = analysis["path_drift"]
    assert path["widths"] == [64, 128, 256] and path["depths"] == [2, 4, 8]
    assert path["slope"] == pytest.approx(-0.5, abs=1e-6)
    assert path["drift_octaves"] == pytest.approx(1.0, abs=1e-6)
    left = {name: law["slope"] for name, law in path["laws"].items()}
    assert left["archscale"] == pytest.approx(0.0, abs=1e-6)
    assert left["depth_sqrt"] == pytest.approx(0.0, abs=1e-6)  # on a path, the two agree
    assert left["tables"] == pytest.approx(-0.5, abs=1e-6)
    assert not analysis["drift"] and not analysis["depth_drift"]  # no fixed-depth family
    assert "path w64d2→w128d4→w256d8: drift 1.00" in format_table(analysis)


def test_the_plots_draw_every_shape_of_a_path(path_sweep, tmp_path):
    analysis = analyze(load_results(path_sweep))
    figure = _loss_vs_lr(analysis, "width")
    (panel,) = [ax for ax in figure.axes if ax.get_visible()]
    labels = [text.get_text() for text in panel.get_legend().get_texts()]
    assert labels == ["width 64 d2", "width 128 d4", "width 256 d8"]
    written = plot_analysis(analysis, tmp_path)
    assert tmp_path / "optimum_along_path.png" in written
    assert tmp_path / "loss_vs_lr_by_depth.png" not in written  # a path is no depth slice


def test_shapes_that_differ_in_another_field_get_their_own_panel(tmp_path):
    """Bytes and BPE runs of one recipe in one folder: two panels, two width families, and the
    table says which is which."""
    results = []
    for tokenizer, extra in (("bytes", {}), ("bpe", {"data": {"tokenizer": "bpe",
                                                               "vocab_size": 4096}})):
        for width in (64, 128):
            for log2_lr in np.arange(-7, -1.5, 1.0):
                results.append(run_result("mup", width, log2_lr, 0, 2 + 0.05 * (log2_lr + 4) ** 2,
                                          root=tmp_path, extra=extra))
    write_results(tmp_path, results)
    analysis = analyze(load_results(tmp_path))
    assert len(analysis["drift"]) == 2
    figure = _loss_vs_lr(analysis, "width")
    assert len([ax for ax in figure.axes if ax.get_visible()]) == 2
    table = format_table(analysis)
    assert "data.tokenizer=bpe" in table and "data.tokenizer=bytes" in table


def test_the_cli_transfers_along_the_path_with_a_chosen_law(path_sweep, tmp_path, capsys):
    """scaling-transfer --law archscale from the path's w256 d8 proxy to w1024 d32: η × ½ for
    the width, no depth factor; the overrides file composes back to that LR."""
    import yaml

    from experiments.transfer import main

    out = tmp_path / "t.yaml"
    main([str(path_sweep), "--width", "1024", "--depth", "32", "--law", "archscale",
          "--out", str(out)])
    printed = capsys.readouterr().out
    assert "proxy: hyperp transformer w256 d8" in printed
    assert "the archscale law moves the base LR: η × (w0/w)^0.5 = ×0.5" in printed
    assert "the archscale law has no depth factor" in printed
    target = to_run_config(compose(yaml.safe_load(out.read_text())))
    assert math.log2(target.optim.lr) == pytest.approx(-3.3 - 1.0 - 1.0, abs=1e-6)


def test_each_optimizer_gets_the_law_measured_for_it():
    """μP + Muon's default is its measured η × (w0/w)^0.27; μP + AdamW keeps the tables."""
    muon = to_run_config(compose(["optim=muon", "model.width=64"]))
    adamw = to_run_config(compose(["model.width=64"]))
    assert transfer(muon, 0.02, width=256).lr == pytest.approx(0.02 * 4**-0.27, rel=1e-12)
    assert transfer(adamw, 0.01, width=256).lr == 0.01
    assert transfer(muon, 0.02, width=256, law="tables").lr == 0.02
