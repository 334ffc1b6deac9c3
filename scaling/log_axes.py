"""Log axes that read correctly, shared by every figure: plain tick labels (0.5, 1, 2, 30, 1000,
never 3×10¹) at each octave or decade an axis spans, or at a sweep's own values, and a y range
wide enough that a flat line looks flat.

matplotlib's own log ticks label only powers of the base, so over less than an octave (a decade)
an axis gets one label or none, and its autoscaling stretches a 1% change over the whole panel.
"""

from __future__ import annotations

import math

import numpy as np
from matplotlib.ticker import NullLocator

MAX_LOG_TICKS = 8  # labels on one log axis; more would crowd it
# The least factor a log y axis spans: over less, a slope of −0.00 fills the panel like a fall.
MIN_LOG_SPAN = 4.0
MARGIN = 0.05  # of an axis's range, at each end, so that the end markers are whole


def plain(value: float, digits: int = 3) -> str:
    """`value` to `digits` significant digits, but every digit before the point, as a decimal
    (0.00146, 2.5, 30, 4096), or as 1.5e10 outside [1e-4, 1e6), where a decimal runs long."""
    if value == 0 or 1e-4 <= abs(value) < 1e6:
        whole_digits = math.floor(math.log10(abs(value))) + 1 if value else 1
        return np.format_float_positional(value, precision=max(digits, whole_digits),
                                          unique=True, fractional=False, trim="-")
    mantissa, exponent = f"{value:.{digits - 1}e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def set_ticks(axis, ticks: list[float], label=plain) -> None:
    """Major ticks at `ticks`, each written by `label(value, digits)` with the fewest digits (≥ 3)
    that tell them apart; no minor ticks, which matplotlib would label as 3×10¹."""
    for digits in range(3, 8):
        labels = [label(v, digits) for v in ticks]
        if len(set(labels)) == len(labels):
            break
    axis.set_ticks(ticks, labels)
    axis.set_minor_locator(NullLocator())


def label_log_axis(axis, values: list[float], label=plain) -> None:
    """Ticks at the data's own values: a sweep's widths, token budgets or compute."""
    set_ticks(axis, value_ticks(values), label)


def value_ticks(values: list[float]) -> list[float]:
    """Distinct values at least 1/(MAX_LOG_TICKS − 1) of their log range apart, smallest first, so
    labels do not overlap; a lone value gets a neighbour an octave to each side."""
    distinct = sorted(set(values))
    if len(distinct) == 1:
        return [distinct[0] / 2, distinct[0], distinct[0] * 2]
    gap = math.log(distinct[-1] / distinct[0]) / (MAX_LOG_TICKS - 1)
    ticks = [distinct[0]]
    for value in distinct[1:]:
        if math.log(value / ticks[-1]) >= gap:
            ticks.append(value)
    return ticks


def octave_ticks(lo: float, hi: float) -> list[float]:
    """Ticks inside [lo, hi] at each octave, with 1.5× between while few fit (0.75, 1, 1.5, 2,
    3); at each decade where octaves would crowd the axis, and every n-th decade beyond that."""
    octaves = [2.0**k for k in range(math.floor(math.log2(lo)), math.ceil(math.log2(hi)) + 1)]
    decades = [10.0**k for k in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)]
    for ladder in ([o * s for o in octaves for s in (1.0, 1.5)], octaves, decades):
        inside = sorted(t for t in ladder if lo <= t <= hi)
        if len(inside) <= MAX_LOG_TICKS:
            return inside
    return inside[::math.ceil(len(inside) / MAX_LOG_TICKS)]


def _widened(lo: float, hi: float, least: float) -> tuple[float, float]:
    """[lo, hi] widened about its middle to at least `least`, then by MARGIN at each end."""
    widen = max(0.0, least - (hi - lo)) / 2
    margin = MARGIN * max(hi - lo, least)
    return lo - widen - margin, hi + widen + margin


def span_log_y(ax, values: list[float]) -> None:
    """A log y axis over measured values (losses, RMS, σ, their ratios): at least MIN_LOG_SPAN
    wide about them, labelled at each octave or decade. With shared y, call it once with every
    panel's values."""
    positive = [v for v in values if v > 0 and math.isfinite(v)]
    if not positive:  # every run diverged: nothing to span
        return
    log_lo, log_hi = _widened(math.log(min(positive)), math.log(max(positive)),
                              math.log(MIN_LOG_SPAN))
    lo, hi = math.exp(log_lo), math.exp(log_hi)
    ax.set_ylim(lo, hi)
    set_ticks(ax.yaxis, octave_ticks(lo, hi))


def span_octaves_y(ax, log2_values: list[float]) -> None:
    """A linear y axis in octaves (an optimal log₂ LR) at least log₂ MIN_LOG_SPAN octaves wide
    about the values, for the same reason as span_log_y."""
    ax.set_ylim(*_widened(min(log2_values), max(log2_values), math.log2(MIN_LOG_SPAN)))
