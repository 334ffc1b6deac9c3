"""The fits a sweep's analysis makes: the optimal LR of a loss curve, and power laws."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Optimum:
    log2_lr: float  # the parabola's vertex when fitted, else the grid argmin
    argmin_log2_lr: float
    loss: float
    on_edge: bool  # the argmin is the grid's smallest or largest finite LR
    fitted: bool


def fit_optimum(log2_lr, loss, half_window: int = 2) -> Optimum:
    """Vertex of a quadratic in log2 LR through the points around the argmin; non-finite dropped."""
    x, y = np.asarray(log2_lr, float), np.asarray(loss, float)
    order = np.argsort(x)
    x, y = x[order], y[order]
    x, y = x[np.isfinite(y)], y[np.isfinite(y)]
    if x.size == 0:
        raise ValueError("fit_optimum: no finite loss (every run diverged); expected at least one")
    best = int(np.argmin(y))
    on_edge = best in (0, x.size - 1)
    window = slice(max(0, best - half_window), best + half_window + 1)
    x_fit, y_fit = x[window], y[window]
    if x_fit.size >= 3:
        quadratic = np.polyfit(x_fit, y_fit, 2)
        if quadratic[0] > 0:  # a concave or flat fit has no minimum to trust
            vertex = float(np.clip(-quadratic[1] / (2 * quadratic[0]), x_fit[0], x_fit[-1]))
            loss_at_vertex = float(np.polyval(quadratic, vertex))
            return Optimum(vertex, float(x[best]), loss_at_vertex, on_edge, fitted=True)
    return Optimum(float(x[best]), float(x[best]), float(y[best]), on_edge, fitted=False)


@dataclass(frozen=True)
class PowerLaw:
    coefficient: float
    exponent: float
    exponent_stderr: float  # nan with exactly 2 points: no residual degrees of freedom


def fit_power_law(x, y) -> PowerLaw:
    """y = coefficient · x^exponent by least squares of log y on log x."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if np.unique(x).size < 2:
        raise ValueError(f"fit_power_law: x={x.tolist()}: expected at least 2 distinct values")
    if (x <= 0).any() or (y <= 0).any():
        raise ValueError(f"fit_power_law: x={x.tolist()}, y={y.tolist()}: expected positive values")
    log_x, log_y = np.log(x), np.log(y)
    exponent, intercept = np.polyfit(log_x, log_y, 1)
    residuals = log_y - (exponent * log_x + intercept)
    dof = x.size - 2
    spread = float(np.sum((log_x - log_x.mean()) ** 2))
    stderr = math.sqrt(residuals @ residuals / dof / spread) if dof > 0 else math.nan
    return PowerLaw(float(math.exp(intercept)), float(exponent), stderr)
