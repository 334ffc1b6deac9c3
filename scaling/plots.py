"""Sweep plots from an analysis dict: LR curves per width, optimum drift, compute and token laws.

Figures are built with matplotlib's object API (no pyplot), so saving to PNG uses Agg and leaves
no global figure state behind.
"""

from __future__ import annotations

import textwrap
from collections import defaultdict
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, NullFormatter

from scaling.training.files import atomic_open

DPI = 120
PARAM_LABELS = {"sp": "SP", "mup": "μP"}
PARAM_ORDER = ["sp", "mup"]  # the baseline on the left, the scaled parametrization next to it
MARKERS = "osD^v"  # hollow and distinct, so coinciding points of two fits stay visible
FAMILY_FIELDS = ("param", "optim", "kind", "width", "depth", "tokens", "batch_size")
FIELD_PREFIXES = {"width": "w", "depth": "d", "tokens": "t", "batch_size": "b"}


def family_names(families: list[dict]) -> list[list[str]]:
    """Short name parts per family: its param and depth, plus whichever other fields vary."""
    varying = [f for f in FAMILY_FIELDS
               if f in ("param", "depth") or len({str(fam.get(f)) for fam in families}) > 1]
    return [[FIELD_PREFIXES.get(f, "") + (_tokens_label(fam[f]) if f == "tokens" else str(fam[f]))
             for f in varying if f in fam] for fam in families]


def _family_order(family: dict) -> tuple:
    """SP before μP, then by the family's other fields (tokens numerically)."""
    return (_param_rank(family["param"]), *(family.get(f) for f in FAMILY_FIELDS[1:]))


def plot_analysis(analysis: dict, out_dir: Path) -> list[Path]:
    """Writes every plot that has data to out_dir; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = {
        "loss_vs_lr": _loss_vs_lr(analysis),
        "optimum_vs_width": _optimum_vs_width(analysis["drift"]),
        "loss_vs_compute": _loss_vs_compute(analysis["metric"], analysis["loss_vs_compute"]),
        "optimum_vs_tokens": _optimum_vs_tokens(analysis["lr_vs_tokens"]),
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


def _param_label(param: str) -> str:
    return PARAM_LABELS.get(param, param)


def _param_rank(param: str) -> int:
    return PARAM_ORDER.index(param) if param in PARAM_ORDER else len(PARAM_ORDER)


def _labels(families: list[dict]) -> list[str]:
    """Legend labels such as 'μP d2', or 'μP adamw d2' where the optimizers differ."""
    return [" ".join([_param_label(parts[0]), *parts[1:]]) for parts in family_names(families)]


def _tokens_label(tokens: float) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if tokens >= scale:
            return f"{tokens / scale:.3g}{suffix}"
    return f"{tokens:g}"


def _width_colors(widths: list[int]) -> dict[int, tuple]:
    """Sequential colours by log width; the palest end of viridis is cut off for contrast."""
    norm = LogNorm(min(widths), max(widths) * (1 + 1e-9))  # a single width still spans a range
    cmap = matplotlib.colormaps["viridis"]
    return {w: cmap(0.85 * norm(w)) for w in widths}


def _shown_family(shapes: list[dict]) -> list[dict]:
    """The (kind, depth, tokens, batch) slice with the most widths; ties go to more tokens."""
    families = defaultdict(list)
    for s in shapes:
        families[(s["kind"], s["depth"], s["tokens"], s["batch_size"])].append(s)
    key = max(families, key=lambda k: (len(families[k]), k[2]))
    return sorted(families[key], key=lambda s: s["width"])


def _loss_vs_lr(analysis: dict) -> Figure | None:
    panels = defaultdict(list)
    for s in analysis["shapes"]:
        panels[(s["param"], s["optim"])].append(s)
    if not panels:
        return None
    keys = sorted(panels, key=lambda k: (_param_rank(k[0]), k))
    colors = _width_colors(sorted({s["width"] for s in analysis["shapes"]}))
    fig = Figure(figsize=(5.2 * len(keys), 4.2), layout="constrained")
    axes = fig.subplots(1, len(keys), sharey=True, squeeze=False)[0]
    for ax, key in zip(axes, keys, strict=True):
        shown = _shown_family(panels[key])
        for s in shown:
            _plot_curve(ax, s, colors[s["width"]])
        first = shown[0]
        ax.set_title(f"{_param_label(key[0])} · {key[1]}\n{first['kind']} d{first['depth']}, "
                     f"{_tokens_label(first['tokens'])} tokens, batch {first['batch_size']}")
        ax.set_xlabel("log₂ learning rate")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    axes[0].set_ylabel(f"{analysis['metric']} (mean ± std over seeds)")
    group = f" — {analysis['group']}" if analysis["group"] else ""
    fig.suptitle(f"{analysis['metric']} vs learning rate by width{group}\n"
                 "★ fitted optimum   × diverged (some seed) at that LR")
    return fig


def _plot_curve(ax, shape: dict, color: tuple) -> None:
    """Seed-mean curve with std bars, its fitted optimum, and diverged LRs as x at the top."""
    finite = [p for p in shape["curve"] if p["mean"] is not None]
    ax.errorbar([p["log2_lr"] for p in finite], [p["mean"] for p in finite],
                yerr=[p["std"] for p in finite], color=color, marker="o", ms=3,
                capsize=2, lw=1.3, label=f"width {shape['width']}")
    optimum = shape["optimum"]
    if optimum is not None:  # None when every run of the shape diverged
        ax.plot(optimum["log2_lr"], optimum["loss"], marker="*", ms=13, color=color,
                mec="black", mew=0.8, ls="none", zorder=5)
    diverged = [p["log2_lr"] for p in shape["curve"] if p["diverged"]]
    # y in axes coordinates: a diverged run has no loss to place it by
    ax.plot(diverged, [0.97] * len(diverged), marker="x", ms=8, mew=2, color=color, ls="none",
            transform=ax.get_xaxis_transform())


def _optimum_vs_width(drift: list[dict]) -> Figure | None:
    if not drift:
        return None
    drift = sorted(drift, key=lambda d: _family_order(d["family"]))
    fig = Figure(figsize=(8.8, 4.4), layout="constrained")
    ax = fig.subplots()
    summaries = []
    for d, label in zip(drift, _labels([d["family"] for d in drift]), strict=True):
        edge = " (optimum at grid edge)" if d["any_on_edge"] else ""
        ax.errorbar(d["widths"], d["log2_lr"], yerr=d["log2_lr_std"], marker="o", capsize=3,
                    label=f"{label}{edge}")
        summaries.append(f"{label} {_octaves(d['drift_octaves'], d['drift_uncertainty'])}")
    widths = sorted({w for d in drift for w in d["widths"]})
    ax.set_xscale("log", base=2)
    ax.set_xticks(widths, [str(w) for w in widths])
    ax.minorticks_off()
    ax.set_xlabel("width")
    ax.set_ylabel("optimal log₂ learning rate")
    # non-breaking spaces keep each family's drift on one line of the wrapped title
    drifts = ", ".join(summary.replace(" ", "\u00a0") for summary in summaries)
    fig.suptitle(textwrap.fill(f"Optimal LR vs width — drift: {drifts}", 90))
    ax.grid(alpha=0.3)
    fig.legend(loc="outside right center")
    return fig


def _octaves(drift: float, uncertainty: float | None) -> str:
    return f"{drift:.2f}" + (f" ± {uncertainty:.2f}" if uncertainty is not None else "") + " oct"


def _power_law_label(name: str, exponent: float, stderr: float | None) -> str:
    spread = f" ± {stderr:.3f}" if stderr is not None else ""
    return f"{name}: exponent {exponent:.3f}{spread}"


def _plot_power_law(ax, x: list[float], fit: dict, color: str, name: str) -> None:
    """The fitted line y = coefficient · x^exponent across the data's x range."""
    grid = np.geomspace(min(x), max(x), 50)
    ax.plot(grid, fit["coefficient"] * grid ** fit["exponent"], color=color, ls="--",
            label=_power_law_label(name, fit["exponent"], fit["exponent_stderr"]))


def _loss_vs_compute(metric: str, fits: list[dict]) -> Figure | None:
    if not fits:
        return None
    fits = sorted(fits, key=lambda f: (_param_rank(f["param"]), f["optim"]))
    fig = Figure(figsize=(8.8, 4.4), layout="constrained")
    ax = fig.subplots()
    for i, fit in enumerate(fits):
        name = f"{_param_label(fit['param'])} · {fit['optim']}"
        color = f"C{i}"
        ax.plot(fit["compute"], fit["loss"], MARKERS[i % len(MARKERS)], color=color, mfc="none",
                mew=1.5, label=f"{name}: best per shape")
        _plot_power_law(ax, fit["compute"], fit, color, f"{name} fit")
    ax.set_xscale("log")
    ax.set_yscale("log")
    # losses span well under a decade: label the log axis's minor ticks in plain numbers
    ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%.3g"))
    ax.xaxis.set_minor_formatter(NullFormatter())
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
                color=color, mfc="none", mew=1.5, label=label)
        _plot_power_law(ax, fit["tokens"], fit, color, f"{label} fit")
    ax.set_xscale("log")
    ax.set_yscale("log", base=2)
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("training tokens")
    ax.set_ylabel("optimal learning rate")
    fig.suptitle("Optimal LR vs training tokens")
    ax.grid(alpha=0.3, which="both")
    fig.legend(loc="outside right center", fontsize="small")
    return fig
