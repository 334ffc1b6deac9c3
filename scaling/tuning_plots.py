"""The multiplier tunes as contour plots: loss over (log2 LR, log2 multiplier), one panel per tune,
with each multiplier value's best LR and the joint optimum marked."""

from __future__ import annotations

import math
import textwrap

import numpy as np
from matplotlib.figure import Figure
from matplotlib.tri import Triangulation

# Losses above the panel's best + this many nats share one colour, so the basin keeps its detail.
CONTRAST_NATS = 0.4
COLUMNS = 3


def tune_contours(tunes: list[dict]) -> Figure | None:
    """One panel per tune; None without tunes."""
    if not tunes:
        return None
    rows = math.ceil(len(tunes) / COLUMNS)
    columns = min(COLUMNS, len(tunes))
    fig = Figure(figsize=(4.2 * columns, 3.6 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, columns, squeeze=False)).ravel()
    for ax, tune in zip(axes, tunes, strict=False):
        _panel(fig, ax, tune)
    for ax in axes[len(tunes):]:
        ax.set_visible(False)
    star = ", ★ joint optimum" if any(t["optimum"]["fitted"] for t in tunes) else ""
    fig.suptitle(f"Loss over LR × multiplier (○ best LR per multiplier value{star})")
    return fig


def _panel(fig: Figure, ax, tune: dict) -> None:
    x, y, z = [], [], []
    for log2_value, curve in zip(tune["log2_values"], tune["curves"], strict=True):
        for log2_lr, loss in curve:
            if loss is not None and math.isfinite(loss):
                x.append(log2_lr), y.append(log2_value), z.append(loss)
    best = min(z)
    levels = np.linspace(best, best + CONTRAST_NATS, 17)
    clipped = np.minimum(np.asarray(z), best + CONTRAST_NATS)
    filled = ax.tricontourf(Triangulation(x, y), clipped, levels=levels, cmap="viridis_r")
    fig.colorbar(filled, ax=ax, label="loss", format="%.2f")
    ax.scatter(x, y, s=4, c="k", alpha=0.3)
    ax.plot(tune["log2_lr"], tune["log2_values"], "o-", color="w", mec="k", ms=5, lw=1)
    o = tune["optimum"]
    if o["fitted"]:  # a vertex through ≥ 3 multiplier values around the best, not a grid argmin
        ax.plot([o["log2_lr"]], [o["log2_value"]], "*", color="r", mec="k", ms=14)
    f = tune["family"]
    edge = " (grid edge)" if o["on_edge"] else ""
    optimum = f"{o['value']:.3g}{edge}" if o["fitted"] else "optimum n/a"
    ax.set_title(textwrap.fill(f"{tune['field']} — {f['param']} {f['optim']} w{f['width']} "
                               f"d{f['depth']}: {optimum}", 44), fontsize=9)
    ax.set_xlabel("log₂ learning rate")
    ax.set_ylabel(f"log₂ {tune['field']}")
