"""Sweep plots from an analysis dict: LR curves per width and per depth, optimum drift along
each, compute and token laws.

Figures are built with matplotlib's object API (no pyplot), so saving to PNG uses Agg and leaves
no global figure state behind.
"""

from __future__ import annotations

import math
import textwrap
from collections import defaultdict
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from scaling import schemes
from scaling.analysis import exponent_text
from scaling.files import atomic_open
from scaling.log_axes import label_log_axis, span_log_y, span_octaves_y
from scaling.shapes import optim_label, setting_label
from scaling.tuning_plots import tune_contours

DPI = 120
# baselines on the left, each scaled parametrization to the right of what it extends
MARKERS = "osD^v"  # hollow and distinct, so coinciding points of two fits stay visible
# "probes" (MeZO's probe scaling) exists only in MeZO families, so others' names never show it
FAMILY_FIELDS = ("param", "optim", "probes", "kind", "width", "depth", "tokens", "batch_size",
                 "adam_lr", "setting")
FIELD_PREFIXES = {"width": "w", "depth": "d", "tokens": "t", "batch_size": "b",
                  "adam_lr": "adam_lr="}
PANEL_COLUMNS = 4  # loss-vs-LR panels per row


def family_names(families: list[dict], always: tuple[str, ...] = ("param", "depth")
                 ) -> list[list[str]]:
    """Short name parts per family: its `always` fields (param and depth; a depth-drift family,
    which has no one depth, gives param and width), plus whichever other fields vary."""
    varying = [f for f in FAMILY_FIELDS
               if f in always or len({str(fam.get(f)) for fam in families}) > 1]
    return [[FIELD_PREFIXES.get(f, "") + _field_text(f, fam[f]) for f in varying if f in fam]
            for fam in families]


def _field_text(field: str, value) -> str:
    if field == "tokens":
        return _tokens_label(value)
    if field == "setting":
        return " ".join(f"{k}={v}" for k, v in value.items())
    return f"{value:g}" if isinstance(value, float) else str(value)


def _family_order(family: dict) -> tuple:
    """SP before μP, then by the family's other fields (tokens numerically)."""
    return (schemes.order(family["param"]), *(family.get(f, "") for f in FAMILY_FIELDS[1:]))


def plot_analysis(analysis: dict, out_dir: Path) -> list[Path]:
    """Writes every plot that has data to out_dir; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = {
        "loss_vs_lr": _loss_vs_lr(analysis, "width"),
        "optimum_vs_width": _optimum_vs(analysis["drift"], "width"),
        "loss_vs_lr_by_depth": _loss_vs_lr(analysis, "depth"),
        "optimum_vs_depth": _optimum_vs(analysis["depth_drift"], "depth"),
        "optimum_along_path": _optimum_along_path(analysis.get("path_drift", [])),
        "loss_vs_compute": _loss_vs_compute(analysis["metric"], analysis["loss_vs_compute"]),
        "optimum_vs_tokens": _optimum_vs_tokens(analysis["lr_vs_tokens"]),
        "multiplier_tunes": tune_contours(analysis.get("tunes", [])),
    }
    written = []
    for stem, fig in plots.items():
        if fig is not None:
            written.append(_save(fig, out_dir / f"{stem}.png"))
    return written


def _save(fig: Figure, path: Path) -> Path:
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=DPI, bbox_inches="tight")
    return path


def _labels(families: list[dict], always: tuple[str, ...] = ("param", "depth")) -> list[str]:
    """Legend labels such as 'μP d2', or 'μP adamw d2' where the optimizers differ."""
    return [" ".join([schemes.label(parts[0]), *parts[1:]])
            for parts in family_names(families, always)]


def _tokens_label(tokens: float, digits: int = 3) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if tokens >= scale:
            return f"{tokens / scale:.{digits}g}{suffix}"
    return f"{tokens:.{digits}g}"


def _seed_note(seed_counts: list[int]) -> str:
    """What a plotted value is: a mean ± std over seeds, or one seed's value (no spread)."""
    most = max(seed_counts)
    return "one seed" if most == 1 else f"mean ± std over {most} seeds"


def _line_with_spread(ax, x: list, y: list, spread: list, seed_counts: list[int], capsize: float,
                      **style) -> None:
    """The line, with std bars only where ≥ 2 seeds give a spread: one seed has none to show."""
    (line,) = ax.plot(x, y, **style)
    bars = [(a, b, e) for a, b, e, n in zip(x, y, spread, seed_counts, strict=True) if n >= 2]
    if bars:
        bar_x, bar_y, bar_e = zip(*bars, strict=True)
        ax.errorbar(bar_x, bar_y, yerr=bar_e, color=line.get_color(), lw=line.get_linewidth(),
                    ls="none", capsize=capsize)


def _size_colors(sizes: list[tuple[int, int]]) -> dict[tuple[int, int], tuple]:
    """Sequential colours by (width, depth), or (depth, width): one width's depths get
    neighbouring shades of their own, so that no shape hides behind another of its width. The
    palest end of viridis is cut off for contrast."""
    cmap = matplotlib.colormaps["viridis"]
    return {size: cmap(0.85 * i / max(len(sizes) - 1, 1)) for i, size in enumerate(sizes)}


def _other_axis(axis: str) -> str:
    return "depth" if axis == "width" else "width"


def _panel_key(shape: dict) -> tuple:
    """What one loss-vs-LR panel holds fixed: the recipe and every setting besides the sizes."""
    return (shape["param"], shape["optim"], shape.get("probes", ""), setting_label(shape),
            tuple(sorted((k, str(v)) for k, v in shape.get("setting", {}).items())))


def _varying(shapes: list[dict], fields: tuple[str, ...]) -> list[str]:
    return [f for f in fields if len({s[f] for s in shapes}) > 1]


def _loss_vs_lr(analysis: dict, axis: str) -> Figure | None:
    """One panel per recipe and setting (param, optim, MeZO probes, tuned values, any other
    config field that differs), a curve per shape in it, coloured by width (or depth), then by
    the other size: every shape of the sweep is drawn and told apart. The depth figure only
    where some panel holds several depths at one width, since most sweeps have one depth (a
    joint width–depth path is drawn by width)."""
    panels = defaultdict(list)
    for s in analysis["shapes"]:
        panels[_panel_key(s)].append(s)
    if axis == "depth":
        panels = {key: shapes for key, shapes in panels.items()
                  if any(len({s["depth"] for s in shapes if s["width"] == w}) > 1
                         for w in {s["width"] for s in shapes})}
    if not panels:
        return None
    keys = sorted(panels, key=lambda k: (schemes.order(k[0]), k))
    fixed = _other_axis(axis)
    colors = _size_colors(sorted({(s[axis], s[fixed]) for s in analysis["shapes"]}))
    columns = min(len(keys), PANEL_COLUMNS)
    rows = math.ceil(len(keys) / columns)
    fig = Figure(figsize=(5.2 * columns, 4.4 * rows), layout="constrained")
    axes = fig.subplots(rows, columns, sharey=True, squeeze=False).ravel()
    for ax, key in zip(axes, keys, strict=False):
        shapes = sorted(panels[key], key=lambda s: (s[axis], s[fixed], s["tokens"]))
        extra = _varying(shapes, (fixed, "tokens", "batch_size"))
        for i, s in enumerate(shapes):
            same_size = sum(t[axis] == s[axis] for t in shapes[:i])
            _plot_curve(ax, s, colors[s[axis], s[fixed]], axis, extra,
                        MARKERS[same_size % len(MARKERS)])
        first = shapes[0]
        probes = f" · {key[2]} probes" if key[2] else ""
        held = [f"{first['kind']}"] + [
            f"{FIELD_PREFIXES[f]}{_tokens_label(first[f]) if f == 'tokens' else first[f]}"
            for f in (fixed, "tokens", "batch_size") if f not in extra]
        setting = " ".join([key[3], *(f"{k}={v}" for k, v in key[4])]).strip()
        ax.set_title("\n".join(line for line in (
            f"{schemes.label(key[0])} · {key[1]}{probes}", textwrap.fill(setting, 48),
            " ".join(held)) if line), fontsize="medium")
        ax.set_xlabel("log₂ learning rate")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    seed_counts = [len(s["seeds"]) for s in analysis["shapes"]]
    for ax in axes[::columns]:
        ax.set_ylabel(f"{analysis['metric']} ({_seed_note(seed_counts)})")
    group = f" — {analysis['group']}" if analysis["group"] else ""
    some_seed = " (some seed)" if max(seed_counts) > 1 else ""
    drawn = [s for key in keys for s in panels[key]]
    key_lines = [text for text, applies in (
        ("★ fitted optimum", any(_fitted(s) for s in drawn)),
        (f"× diverged{some_seed} at that LR", any(p["diverged"] for s in drawn
                                                  for p in s["curve"]))) if applies]
    fig.suptitle("\n".join([f"{analysis['metric']} vs learning rate by {axis}{group}",
                            *(["   ".join(key_lines)] if key_lines else [])]))
    return fig


def _fitted(shape: dict) -> bool:
    """Whether the shape has an optimum fitted through ≥ 3 LRs around it, not a bare argmin."""
    return shape["optimum"] is not None and shape["optimum"]["fitted"]


def _plot_curve(ax, shape: dict, color: tuple, axis: str, extra: list[str] = (),
                marker: str = "o") -> None:
    """Seed-mean curve with std bars, its fitted optimum (optimum n/a in the label where too few
    LRs fit one), and diverged LRs as x at the top; labelled by its size and the `extra` fields
    that vary in its panel."""
    finite = [p for p in shape["curve"] if p["mean"] is not None]
    label = " ".join([f"{axis} {shape[axis]}", *(
        f"{FIELD_PREFIXES[f]}{_tokens_label(shape[f]) if f == 'tokens' else shape[f]}"
        for f in extra), *([] if _fitted(shape) else ["(optimum n/a)"])])
    _line_with_spread(ax, [p["log2_lr"] for p in finite], [p["mean"] for p in finite],
                      [p["std"] for p in finite], [p["n"] for p in finite], capsize=2,
                      color=color, marker=marker, ms=3, lw=1.3, label=label)
    if _fitted(shape):
        optimum = shape["optimum"]
        ax.plot(optimum["log2_lr"], optimum["loss"], marker="*", ms=13, color=color,
                mec="black", mew=0.8, ls="none", zorder=5)
    diverged = [p["log2_lr"] for p in shape["curve"] if p["diverged"]]
    # y in axes coordinates: a diverged run has no loss to place it by
    ax.plot(diverged, [0.97] * len(diverged), marker="x", ms=8, mew=2, color=color, ls="none",
            transform=ax.get_xaxis_transform())


def _optimum_vs(drift: list[dict], axis: str) -> Figure | None:
    """The optimal log2 LR against width (or depth), a line per family, its drift in the title."""
    if not drift:
        return None
    drift = sorted(drift, key=lambda d: _family_order(d["family"]))
    fig = Figure(figsize=(8.8, 4.4), layout="constrained")
    ax = fig.subplots()
    summaries = []
    always = ("param", _other_axis(axis))
    for d, label in zip(drift, _labels([d["family"] for d in drift], always), strict=True):
        edge = " (optimum at grid edge)" if d["any_on_edge"] else ""
        _line_with_spread(ax, d[f"{axis}s"], d["log2_lr"], d["log2_lr_std"], d["n_seeds"],
                          capsize=3, marker="o", label=f"{label}{edge}")
        summaries.append(f"{label} {_octaves(d['drift_octaves'], d['drift_uncertainty'])}")
    span_octaves_y(ax, [v for d in drift for v in _bar_ends(d)])
    sizes = sorted({w for d in drift for w in d[f"{axis}s"]})
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(w) for w in sizes])
    ax.minorticks_off()
    ax.set_xlabel(axis)
    bars = any(n >= 2 for d in drift for n in d["n_seeds"])
    ax.set_ylabel("optimal log₂ learning rate" + (" (bars: std over seeds)" if bars else ""))
    # non-breaking spaces keep each family's drift on one line of the wrapped title
    drifts = ", ".join(summary.replace(" ", "\u00a0") for summary in summaries)
    fig.suptitle(textwrap.fill(f"Optimal LR vs {axis} — drift: {drifts}", 90))
    ax.grid(alpha=0.3)
    fig.legend(loc="outside right center")
    return fig


def _bar_ends(drift: dict) -> list[float]:
    """Both ends of each optimum's std bar; the optimum itself where one seed gives no bar."""
    return [v + sign * (std if n >= 2 else 0.0) for v, std, n in zip(
        drift["log2_lr"], drift["log2_lr_std"], drift["n_seeds"], strict=True) for sign in (-1, 1)]


def _optimum_along_path(paths: list[dict]) -> Figure | None:
    """Each joint width–depth path's optimal LR against width (ticks name the depth too), with
    each LR law's prediction from the path's first point, dashed."""
    if not paths:
        return None
    fig = Figure(figsize=(5.6 * len(paths), 4.4), layout="constrained")
    axes = fig.subplots(1, len(paths), squeeze=False)[0]
    for ax, d in zip(axes, paths, strict=True):
        widths = d["widths"]
        _line_with_spread(ax, widths, d["log2_lr"], d["log2_lr_std"], d["n_seeds"], capsize=3,
                          marker="o", color="black", label="measured optimum")
        for i, (name, law) in enumerate(d["laws"].items()):
            ax.plot(widths, law["predicted_log2_lr"], ls="--", marker=MARKERS[i + 1],
                    mfc="none", color=f"C{i}",
                    label=f"{name} law (slope left {law['slope']:+.2f}/doubling)")
        span_octaves_y(ax, [*_bar_ends(d), *(v for law in d["laws"].values()
                                             for v in law["predicted_log2_lr"])])
        ax.set_xscale("log", base=2)
        ax.set_xticks(widths, [f"w{w}\nd{depth}" for w, depth in zip(widths, d["depths"],
                                                                      strict=True)])
        ax.minorticks_off()
        f = d["family"]
        ax.set_title(f"{schemes.label(f['param'])} · {optim_label(f)}: drift "
                     f"{_octaves(d['drift_octaves'], d['drift_uncertainty'])}")
        ax.set_xlabel("width and depth along the path")
        ax.set_ylabel("optimal log₂ learning rate")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle("Optimal LR along a joint width–depth path, and what each LR law predicts")
    return fig


def _octaves(drift: float, uncertainty: float | None) -> str:
    return f"{drift:.2f}" + (f" ± {uncertainty:.2f}" if uncertainty is not None else "") + " oct"


def _points_label(label: str, fit: dict) -> str:
    """The data's legend label, saying so when there were too few points for a power law."""
    return label if fit["fitted"] else f"{label} ({exponent_text(fit)})"


def _plot_power_law(ax, x: list[float], fit: dict, color: str, name: str) -> None:
    """The fitted line y = coefficient · x^exponent across the data's x range, if fitted."""
    if not fit["fitted"]:
        return
    grid = np.geomspace(min(x), max(x), 50)
    ax.plot(grid, fit["coefficient"] * grid ** fit["exponent"], color=color, ls="--",
            label=f"{name}: exponent {exponent_text(fit)}")


def _loss_vs_compute(metric: str, fits: list[dict]) -> Figure | None:
    if not fits:
        return None
    fits = sorted(fits, key=lambda f: (schemes.order(f["param"]), f["optim"], f.get("probes", "")))
    fig = Figure(figsize=(8.8, 4.4), layout="constrained")
    ax = fig.subplots()
    for i, fit in enumerate(fits):
        name = f"{schemes.label(fit['param'])} · {optim_label(fit)}"
        color = f"C{i}"
        ax.plot(fit["compute"], fit["loss"], MARKERS[i % len(MARKERS)], color=color, mfc="none",
                mew=1.5, label=_points_label(f"{name}: best per shape", fit))
        _plot_power_law(ax, fit["compute"], fit, color, f"{name} fit")
    ax.set_xscale("log")
    ax.set_yscale("log")
    label_log_axis(ax.xaxis, [c for fit in fits for c in fit["compute"]])
    span_log_y(ax, [loss for fit in fits for loss in fit["loss"]])
    ax.set_xlabel("compute (FLOPs)")
    ax.set_ylabel(f"best {metric}")
    fig.suptitle(f"Best {metric} vs compute")
    ax.grid(alpha=0.3, which="both")
    fig.legend(loc="outside right center", fontsize="small")
    return fig


def _optimum_vs_tokens(fits: list[dict]) -> Figure | None:
    if not fits:
        return None
    fits = sorted(fits, key=lambda f: _family_order(f["family"]))
    fig = Figure(figsize=(8.8, 4.4), layout="constrained")
    ax = fig.subplots()
    for i, (fit, label) in enumerate(zip(fits, _labels([f["family"] for f in fits]),
                                         strict=True)):
        color = f"C{i}"
        ax.plot(fit["tokens"], [2.0 ** v for v in fit["log2_lr"]], MARKERS[i % len(MARKERS)],
                color=color, mfc="none", mew=1.5, label=_points_label(label, fit))
        _plot_power_law(ax, fit["tokens"], fit, color, f"{label} fit")
    ax.set_xscale("log")
    ax.set_yscale("log", base=2)
    label_log_axis(ax.xaxis, [t for fit in fits for t in fit["tokens"]], label=_tokens_label)
    span_log_y(ax, [2.0 ** v for fit in fits for v in fit["log2_lr"]])
    ax.set_xlabel("training tokens")
    ax.set_ylabel("optimal learning rate")
    fig.suptitle("Optimal LR vs training tokens")
    ax.grid(alpha=0.3, which="both")
    fig.legend(loc="outside right center", fontsize="small")
    return fig
