"""Coordinate-check figures: RMS against width (or depth) on log-log axes, one line per module
output or parameter update, one column per parametrization, one figure per step.

Built with matplotlib's object API (no pyplot), like scaling/plots.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure

from scaling.coord_check import (
    DEPTH,
    UPDATE,
    CoordStats,
    Slope,
    base_name,
    comparable,
    is_update,
)
from scaling.files import atomic_open
from scaling.log_axes import label_log_axis, span_log_y

DPI = 100
FIGURE_WIDTH, FIGURE_HEIGHT, LEGEND = 5.4, 3.6, 1.7  # inches per column and row; legend width
LINESTYLES = ("-", "--", ":", "-.")  # successive layers of one module or parameter


def _series(stats: CoordStats, axis: str, step: int) -> dict[str, list[float]]:
    """quantity -> its RMS at each axis value, for the quantities present at every value."""
    values = sorted(stats)
    per_value = [comparable(stats[v][step], v if axis == DEPTH else None) for v in values]
    return {n: [p[n] for p in per_value] for n in per_value[0] if all(n in p for p in per_value)}


def _styles(names: list[str]) -> dict[str, dict]:
    """A colour per module or parameter, a line style per layer."""
    bases = list(dict.fromkeys(base_name(n) for n in names))
    colors = matplotlib.colormaps["tab10" if len(bases) <= 10 else "tab20"]
    styles, layer_of = {}, {}
    for name in names:
        base = base_name(name)
        layer = layer_of[base] = layer_of.get(base, -1) + 1
        styles[name] = {"color": colors(bases.index(base) % colors.N),
                        "ls": LINESTYLES[layer % len(LINESTYLES)]}
    return styles


def step_figure(stats_by_param: dict[str, CoordStats], rows: list[Slope], axis: str, step: int,
                title: str, tolerance: float) -> Figure:
    """Module outputs (top row) and, after a step, parameter updates (bottom row) against the
    axis values, a column per parametrization; each line's fitted slope in its legend, ✗ where
    a checked slope is beyond the tolerance. Each row spans a factor of 4 at least
    (scaling/log_axes.py), so that a flat line reads flat however close its values."""
    slope_of = {(r.param, r.quantity): r for r in rows if r.axis == axis and r.step == step}
    kinds = ["module outputs"] + (["parameter updates"] if step > 0 else [])
    params = list(stats_by_param)
    fig = Figure(figsize=(FIGURE_WIDTH * len(params), FIGURE_HEIGHT * len(kinds)))
    # room on the right of every column for its legend (a fixed layout: measuring each text,
    # as a constrained layout does, doubles the drawing time)
    fig.subplots_adjust(left=0.9 / (FIGURE_WIDTH * len(params)), right=1 - LEGEND / FIGURE_WIDTH
                        / len(params), wspace=LEGEND / (FIGURE_WIDTH - LEGEND) * 1.15,
                        bottom=0.55 / (FIGURE_HEIGHT * len(kinds)), top=1 - 0.6 / (
                            FIGURE_HEIGHT * len(kinds)), hspace=0.35)
    # one scale per row, so that a column's growth reads against the other's flat lines
    axes = fig.subplots(len(kinds), len(params), squeeze=False, sharey="row")
    row_values = [[] for _ in kinds]
    for column, (param, stats) in enumerate(stats_by_param.items()):
        series = _series(stats, axis, step)
        for row, kind in enumerate(kinds):
            ax = axes[row][column]
            names = [n for n in series if is_update(n) == (kind == "parameter updates")]
            styles = _styles(names)
            for name in names:
                if not all(v > 0 and math.isfinite(v) for v in series[name]):
                    continue  # nothing to draw on a log axis (a zero readout's init logits)
                fit = slope_of.get((param, name))
                mark = "" if fit is None or not fit.required or fit.within(tolerance) else " ✗"
                short = name.removeprefix(UPDATE + "/")
                label = short if fit is None else f"{short}  {fit.slope:+.2f}{mark}"
                ax.plot(sorted(stats), series[name], marker="o", ms=3, lw=1.2, label=label,
                        **styles[name])
                row_values[row] += series[name]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            label_log_axis(ax.xaxis, sorted(stats))
            ax.set(title=f"{param}: {kind}", xlabel=axis, ylabel="RMS" if column == 0 else None)
            ax.grid(True, which="major", alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5),
                          title="slope", title_fontsize=6, frameon=False)
    for row, values in enumerate(row_values):
        if values:  # the row's axes share y: one range and one set of ticks serve them all
            span_log_y(axes[row][0], values)
    fig.suptitle(f"{title}: RMS against {axis} at step {step}" + (" (init)" if step == 0 else ""))
    return fig


def save_png(fig: Figure, path: Path) -> Path:
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=DPI)
    return path
