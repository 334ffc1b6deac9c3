"""Plots say only what the data supports: no seed spread from one seed, no power law through two
points, no fitted optimum through fewer than three LRs; and they read correctly: every log axis
labelled with plain numbers (never one label, never 3×10¹), a flat line drawn flat, every shape
of a sweep told apart, and the analysis table's footnote only under a row it explains."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from matplotlib.container import ErrorbarContainer
from matplotlib.figure import Figure
from synthetic import run_result

import scaling.plots
import scaling.spectral_report
from optim import MeZOConfig
from scaling.analysis import analyze, format_table
from scaling.config import RunConfig, to_dict
from scaling.coord_check import slope_rows
from scaling.coord_plots import step_figure
from scaling.log_axes import span_log_y
from scaling.tuning_plots import tune_contours

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


# ---- log axes: plain labels at each octave or decade, and never too narrow -------------------

PLAIN_NUMBER = re.compile(r"-?\d+(\.\d+)?(e-?\d+)?")  # 0.5, 30, 1000, 1.5e10; not 3×10¹ nor 2^-7


def _tick_texts(axis) -> list[str]:
    """The labels of the axis's major and minor ticks inside its view, as last drawn."""
    lo, hi = sorted(axis.get_view_interval())
    return [tick.label1.get_text() for tick in axis.get_major_ticks() + axis.get_minor_ticks()
            if lo <= tick.get_loc() <= hi and tick.label1.get_text()]


def _assert_reads(ax, least_factor: float = 4.0) -> None:
    """A log y axis with ≥ 2 plain tick labels, spanning at least `least_factor`."""
    ax.figure.draw_without_rendering()
    labels = _tick_texts(ax.yaxis)
    assert len(labels) >= 2 and all(PLAIN_NUMBER.fullmatch(t) for t in labels), labels
    lo, hi = ax.get_ylim()
    assert hi / lo >= least_factor, (lo, hi)


def test_coord_check_update_rows_are_labelled_and_a_flat_line_stays_flat():
    """Readout updates within 1% across widths (slope −0.00): the update row, shared by both
    columns, spans a factor of 4 and is labelled at octaves, not left bare and stretched."""
    widths = (32, 64, 128)
    stats = {param: {w: {0: {"logits": 1.0}, 1: {"logits": 1.0, "update/readout": 0.01 - d * i}}
                     for i, w in enumerate(widths)} for param, d in (("sp", 1e-4), ("mup", 1e-5))}
    fig = step_figure(stats, slope_rows(stats, "width", "zero"), "width", 1, "mlp", 0.1)
    (mup_updates,) = [ax for ax in fig.axes if ax.get_title() == "mup: parameter updates"]
    assert "-0.00" in mup_updates.get_legend().get_texts()[0].get_text()
    for ax in fig.axes[::2]:  # the first column; the second shares its rows' y
        _assert_reads(ax)
    assert mup_updates.get_ylim() == fig.axes[2].get_ylim()


def _capture_spectral_figures(monkeypatch) -> None:
    """spectral_report's plots return their figure instead of writing it."""
    monkeypatch.setattr(scaling.spectral_report, "_save", lambda fig, path: fig)


def test_spectral_sweep_ratio_axis_is_labelled_beyond_one(monkeypatch):
    """σ ratios within 3% of 1: labels at 0.5 … 2 around the dashed 1, not "1" alone."""
    _capture_spectral_figures(monkeypatch)
    report = {"families": [{"label": f"mup adamw γ={g}", "widths": [32, 64, 128],
                            "roles": {"hidden": {"sigma": [1.0, 1.0 + d, 1.0 + 2 * d]},
                                      "output": {"sigma": [2.0, 2.0 - d, 2.0]}}}
                           for g, d in ((1, 0.01), (0, -0.015))]}
    fig = scaling.spectral_report.plot_sweep(report, Path("unused.png"))
    _assert_reads(fig.axes[0])
    assert {"0.5", "1", "2"} <= set(_tick_texts(fig.axes[0].yaxis))
    assert _tick_texts(fig.axes[0].xaxis) == ["32", "64", "128"]


def test_spectral_comparison_axes_are_plain_numbers(monkeypatch):
    """σ_max 20–34 (under a decade): octave labels (16, 24, 32), not 2×10¹ and 3×10¹."""
    _capture_spectral_figures(monkeypatch)
    rows = [{"matrix": f"blocks/wq/{i}", "role": "hidden", "sigma_a": 20.0 + i,
             "sigma_b": 30.0 + i, "ratio": (30.0 + i) / (20.0 + i)} for i in range(5)]
    fig = scaling.spectral_report.plot_comparison(rows, "A", "B", Path("unused.png"))
    for ax in fig.axes:
        _assert_reads(ax)


def test_loss_vs_compute_of_two_points_spans_a_padded_plain_range(figures):
    """Two budgets whose best losses differ by 3%: y spans a factor of 4, labelled plainly."""
    drawn = figures(_sweep(widths=(32,), steps=(100, 400)))
    _assert_reads(drawn["loss_vs_compute"].axes[0])
    assert all(PLAIN_NUMBER.fullmatch(t)
               for t in _tick_texts(drawn["loss_vs_compute"].axes[0].xaxis))


def test_a_flat_optimum_is_drawn_flat(figures):
    """μP's optimum moves 0.01 octave across widths: the y axis spans 2 octaves at least."""
    results = [r for r in _sweep(widths=(32, 64)) if r["config"]["param"]["name"] == "mup"]
    for r in results:  # move the wider shape's vertex by a hundredth of an octave
        if r["config"]["model"]["width"] == 64:
            r["val_loss"] += 0.05 * 0.02 * (math.log2(r["config"]["optim"]["lr"]) + 7.0)
    ax = figures(results)["optimum_vs_width"].axes[0]
    lo, hi = ax.get_ylim()
    assert hi - lo >= 2.0


# ---- nothing fitted from too few points; every shape visible ---------------------------------

def _stars(fig) -> list:
    return [line for ax in fig.axes for line in ax.get_lines() if line.get_marker() == "*"]


def test_a_star_only_where_three_lrs_fit_an_optimum(figures):
    """Widths trained at one, two and seven LRs: one star, and the legend says which shapes have
    no fitted optimum; a single run gets no star and no ★ key at all."""
    grids = {64: (-7.0,), 128: (-8.0, -7.0), 256: GRID}
    drawn = figures([run_result("mup", w, x, 0, 3.0 + 0.1 * (x + 7.2) ** 2)
                     for w, grid in grids.items() for x in grid])["loss_vs_lr"]
    assert len(_stars(drawn)) == 1
    assert [t.get_text() for t in drawn.axes[0].get_legend().get_texts()] == [
        "width 64 (optimum n/a)", "width 128 (optimum n/a)", "width 256"]
    single = figures([run_result("mup", 64, -7.0, 0, 3.0)])["loss_vs_lr"]
    assert not _stars(single) and "★" not in single.get_suptitle()


def test_every_depth_of_a_depth_sweep_has_its_own_colour_in_loss_vs_lr(figures):
    """The depth demo's sweep: one width, depths 1 and 2 under μP and CompleteP. The width
    figure colours by width first; depth 2 must not hide behind depth 1 in the same colour."""
    results = [run_result(param, 64, x, 0, 2.0 + 1 / depth + 0.05 * (x + 7.0) ** 2,
                          depth=depth, base_depth=1, base_width=64)
               for param in ("mup", "completep") for depth in (1, 2) for x in GRID]
    fig = figures(results)["loss_vs_lr"]
    for ax in fig.axes:
        curves = [line for line in ax.get_lines() if not line.get_label().startswith("_")]
        assert [line.get_label() for line in curves] == ["width 64 d1", "width 64 d2"]
        assert len({line.get_color() for line in curves}) == 2


def test_a_tune_without_a_fitted_optimum_has_no_star():
    """A multiplier tune whose profile has no interior minimum: no ★, "optimum n/a"."""
    log2_values = [-1.0, 0.0, 1.0]
    tune = {"field": "output_mult", "log2_values": log2_values, "log2_lr": [-7.0] * 3,
            "curves": [[(x, 3.0 + v + 0.05 * (x + 7) ** 2) for x in GRID] for v in log2_values],
            "family": {"param": "mup", "optim": "adamw", "width": 64, "depth": 2},
            "optimum": {"log2_lr": -7.0, "log2_value": -1.0, "value": 0.5, "on_edge": True,
                        "fitted": False}}
    fig = tune_contours([tune])
    assert not _stars(fig) and "★" not in fig.get_suptitle()
    assert "optimum n/a" in fig.axes[0].get_title()


# ---- the analysis table's footnotes ----------------------------------------------------------

EDGE_NOTE = "(* optimum at the edge of the LR grid"


def test_the_edge_footnote_appears_only_under_an_edge_row():
    """Interior optima: no `*` and no footnote; an optimum past the grid: both."""
    table = format_table(analyze(_sweep(widths=(32,))))
    assert "*" not in table and EDGE_NOTE not in table
    edge = [run_result("mup", 64, x, 0, 3.0 + 0.05 * (x + 2.0) ** 2) for x in GRID]
    table = format_table(analyze(edge))
    assert "*" in table and EDGE_NOTE in table


def test_the_table_says_n_a_for_what_too_few_points_cannot_give():
    """One seed: no std (n/a, not ± 0.00); two LRs: no fitted optimum (n/a), the argmin shown."""
    row = format_table(analyze([run_result("mup", 64, x, 0, 3.0 + 0.1 * (x + 7.2) ** 2)
                                for x in (-8.0, -7.0)])).splitlines()[2]
    assert re.search(r"\bn/a ± n/a\s+-7\.00\*\s+3\.0040$", row), row


def test_a_log_axis_over_no_finite_value_is_left_alone():
    """Every run diverged: nothing to span, and no error."""
    ax = Figure().subplots()
    ax.set_yscale("log")
    before = ax.get_ylim()
    span_log_y(ax, [math.nan, math.inf, 0.0])
    assert ax.get_ylim() == before
