"""Sweep plots say only what the data supports: no seed spread from one seed, no power law through
two points, and never a log axis with a single tick label."""

from __future__ import annotations

import math

import pytest
from matplotlib.container import ErrorbarContainer
from synthetic import run_result

import scaling.plots
from optim import MeZOConfig
from scaling.analysis import analyze
from scaling.config import RunConfig, to_dict

GRID = [-10.0 + i for i in range(7)]  # log2 LR, -10 ... -4 in octaves


def _sweep(widths=(32, 64), seeds=1, steps=(100,)) -> list[dict]:
    """SP's optimum halves per width doubling, μP's stays; wider is better; more steps is better."""
    results = []
    for param in ("sp", "mup"):
        for width in widths:
            for n_steps in steps:
                vertex = -6.0 - (math.log2(width / 32) if param == "sp" else 1.0)
                vertex -= 0.3 * math.log2(n_steps / 100)
                for seed in range(seeds):
                    for x in GRID:
                        loss = 2.0 + 8 / width + 50 / n_steps + 0.05 * (x - vertex) ** 2
                        results.append(run_result(param, width, x, seed, loss + 0.01 * seed,
                                                  steps=n_steps, depth=2, base_width=32))
    return results


@pytest.fixture
def figures(monkeypatch, tmp_path):
    """plot_analysis of the results' analysis: each figure by file stem, drawn but not saved."""

    def draw(results: list[dict]) -> dict:
        drawn = {}
        monkeypatch.setattr(scaling.plots, "_save", lambda fig, path: drawn.setdefault(path.stem,
                                                                                       fig))
        scaling.plots.plot_analysis(analyze(results), tmp_path)
        for fig in drawn.values():
            fig.draw_without_rendering()  # ticks and limits as they would be saved
        return drawn

    return draw


def _texts(fig) -> list[str]:
    """Every label, title and legend entry of the figure."""
    texts = [t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text"))]
    return [t for t in texts if t]


def _errorbars(fig) -> list[ErrorbarContainer]:
    return [c for ax in fig.axes for c in ax.containers if isinstance(c, ErrorbarContainer)]


def test_one_seed_has_no_error_bars_and_no_seed_spread_in_the_labels(figures):
    drawn = figures(_sweep(seeds=1))
    for stem in ("loss_vs_lr", "optimum_vs_width"):
        assert not _errorbars(drawn[stem]), stem
        texts = " ".join(_texts(drawn[stem]))
        assert "±" not in texts and "over seeds" not in texts, (stem, texts)
    assert "one seed" in drawn["loss_vs_lr"].axes[0].get_ylabel()


def test_several_seeds_get_error_bars_and_say_so(figures):
    drawn = figures(_sweep(seeds=2))
    assert _errorbars(drawn["loss_vs_lr"]) and _errorbars(drawn["optimum_vs_width"])
    assert "mean ± std over 2 seeds" in drawn["loss_vs_lr"].axes[0].get_ylabel()


def _fit_lines(fig) -> list:
    return [line for ax in fig.axes for line in ax.get_lines() if line.get_linestyle() == "--"]


def test_no_power_law_through_two_points(figures):
    """Two budgets at one width: points shown, no fitted line, "not fitted: 2 points" instead."""
    drawn = figures(_sweep(widths=(32,), steps=(100, 400)))
    for stem in ("optimum_vs_tokens", "loss_vs_compute"):
        assert not _fit_lines(drawn[stem]), stem
        assert any("not fitted: 2 points" in t for t in _texts(drawn[stem])), stem
        assert not any("exponent" in t for t in _texts(drawn[stem])), stem


def test_power_law_drawn_through_three_points(figures):
    drawn = figures(_sweep(widths=(32,), steps=(100, 200, 400)))
    assert len(_fit_lines(drawn["optimum_vs_tokens"])) == 2  # SP and μP
    assert any("exponent -0.300" in t for t in _texts(drawn["optimum_vs_tokens"]))


def _visible_tick_labels(axis) -> list[str]:
    """The non-empty labels of the axis's major and minor ticks inside its view."""
    lo, hi = sorted(axis.get_view_interval())
    labels = []
    for ticker, locs in ((axis.major, axis.get_majorticklocs()),
                         (axis.minor, axis.get_minorticklocs())):
        inside = [x for x in locs if lo * (1 - 1e-9) <= x <= hi * (1 + 1e-9)]
        labels += [s for s in ticker.formatter.format_ticks(inside) if s]
    return labels


@pytest.mark.parametrize("widths, steps", [((32, 64), (100,)), ((32,), (100, 200, 400)),
                                           ((32, 64, 128), (100, 200))])
def test_every_log_axis_has_at_least_two_distinct_tick_labels(widths, steps, figures):
    """Data spanning well under a decade (tokens ×4, losses within 10%) still reads off the axis."""
    drawn = figures(_sweep(widths=widths, steps=steps))
    log_axes = [(stem, axis) for stem, fig in drawn.items() for ax in fig.axes
                for axis in (ax.xaxis, ax.yaxis) if axis.get_scale() == "log"]
    assert log_axes
    for stem, axis in log_axes:
        labels = _visible_tick_labels(axis)
        assert len(set(labels)) >= 2 and len(set(labels)) == len(labels), (stem, labels)


def _depth_sweep(depths=(2, 4, 8), widths=(32,)) -> list[dict]:
    """μP's optimum falls half an octave per depth doubling, CompleteP's stays; base depth 2."""
    return [run_result(param, width, x, 0,
                       2.0 + 1 / depth + 0.05 * (x + 7.0 + (0.5 * math.log2(depth / 2)
                                                           if param == "mup" else 0.0)) ** 2,
                       depth=depth, base_depth=2, base_width=32)
            for param in ("mup", "completep") for width in widths for depth in depths
            for x in GRID]


def test_depth_sweep_draws_the_optimum_and_curves_by_depth(figures):
    drawn = figures(_depth_sweep())
    assert {"optimum_vs_depth", "loss_vs_lr_by_depth"} <= set(drawn)
    assert "optimum_vs_width" not in drawn  # one width: nothing drifts with it
    optimum = drawn["optimum_vs_depth"]
    assert optimum.axes[0].get_xlabel() == "depth"
    assert [t.get_text() for t in optimum.axes[0].get_xticklabels()] == ["2", "4", "8"]
    title = " ".join(_texts(optimum))
    assert "Optimal LR vs depth" in title and "CompleteP w32" in title and "μP w32" in title
    curves = drawn["loss_vs_lr_by_depth"]
    assert [ax.get_title().split("\n")[0] for ax in curves.axes] == ["μP · adamw",
                                                                     "CompleteP · adamw"]
    assert all("transformer w32" in ax.get_title() for ax in curves.axes)
    legend = [t.get_text() for t in curves.axes[0].get_legend().get_texts()]
    assert legend == ["depth 2", "depth 4", "depth 8"]


def test_width_by_depth_grid_draws_both_drifts(figures):
    drawn = figures(_depth_sweep(depths=(2, 4), widths=(32, 64)))
    assert {"optimum_vs_width", "loss_vs_lr", "optimum_vs_depth", "loss_vs_lr_by_depth"} <= set(
        drawn)
    labels = [t.get_text() for t in drawn["optimum_vs_depth"].legends[0].get_texts()]
    assert labels == ["μP w32", "μP w64", "CompleteP w32", "CompleteP w64"]


def test_a_width_sweep_draws_no_depth_plots(figures):
    drawn = figures(_sweep(seeds=1))
    assert not {"optimum_vs_depth", "loss_vs_lr_by_depth"} & set(drawn)


def test_mezo_probe_scalings_get_their_own_panels_and_lines(figures):
    """Isotropic and matched MeZO runs of one parametrization: a loss panel and an optimum line
    each, named by the probe scaling."""
    results = []
    for probe in ("isotropic", "matched"):
        for r in _sweep(widths=(32, 64), seeds=1):
            if r["config"]["param"]["name"] == "mup":
                optim = to_dict(RunConfig(optim=MeZOConfig(
                    lr=r["config"]["optim"]["lr"], probe_scaling=probe, update_scaling=probe)))
                results.append(r | {"name": f"{r['name']}-{probe}",
                                    "config": r["config"] | {"optim": optim["optim"]}})
    drawn = figures(results)
    titles = [ax.get_title().split("\n")[0] for ax in drawn["loss_vs_lr"].axes]
    assert titles == ["μP · mezo · isotropic probes", "μP · mezo · matched probes"]
    labels = [t.get_text() for t in drawn["optimum_vs_width"].legends[0].get_texts()]
    assert labels == ["μP isotropic d2", "μP matched d2"]
