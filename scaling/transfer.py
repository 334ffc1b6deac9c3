"""Transfer: the target's hyperparameters from a tuned proxy, by the parametrization's rules.

Each rule is one step that may move the base learning rate and says why. Width is handled by the
parametrization's table (μP moves per-role multipliers, never the base LR; SP has no rule), the
token budget by the data-scaling law η ∝ T^(−k), the batch by η ∝ √(B/B0). Depth steps belong in
TRANSFER_STEPS once the depth rules exist; until then a depth change is refused.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

from scaling.analysis import analyze, shape_id
from scaling.config import ConfigError, RunConfig, SweepConfig, from_dict, validate
from scaling.parametrization import make_parametrization

DATA_EXPONENT = 0.32  # k in η ∝ T^(−k), fitted by HyperP (ArchScale)
BATCH_EXPONENT = 0.5  # η ∝ √(B/B0), HyperP's batch rule


@dataclasses.dataclass(frozen=True)
class TransferResult:
    config: RunConfig  # the target run
    lr: float
    reasons: list[str]  # one line per rule, in the order applied
    role_multipliers: dict[str, tuple[float, float]]  # role -> (proxy, target) LR multiplier



Step = Callable[[RunConfig, RunConfig, float], tuple[float, str | None]]


def _width(proxy: RunConfig, target: RunConfig, k: float) -> tuple[float, str | None]:
    w0, w, base = proxy.model.width, target.model.width, proxy.param.base_width
    if w0 == w:
        return 1.0, None
    if proxy.param.name == "sp":
        return 1.0, (f"width {w0} → {w}: SP has no width rule, so the base LR is copied "
                     "(its optimum is expected to move with width)")
    return 1.0, (f"width {w0} → {w} (m = {w0 / base:g} → {w / base:g} over base width {base}): "
                 f"the {proxy.param.name} table scales the per-role multipliers below, "
                 "the base LR stays")


def _tokens(proxy: RunConfig, target: RunConfig, k: float) -> tuple[float, str | None]:
    t0, t = tokens(proxy), tokens(target)
    if t0 == t:
        return 1.0, None
    factor = (t / t0) ** -k
    return factor, f"tokens {t0:,} → {t:,} (×{t / t0:g}): η × (T/T0)^(−{k:g}) = ×{factor:.4g}"


def _batch(proxy: RunConfig, target: RunConfig, k: float) -> tuple[float, str | None]:
    b0, b = proxy.train.batch_size, target.train.batch_size
    if b0 == b:
        return 1.0, None
    factor = (b / b0) ** BATCH_EXPONENT
    return factor, (f"batch {b0} → {b} sequences (×{b / b0:g}): "
                    f"η × (B/B0)^{BATCH_EXPONENT:g} = ×{factor:.4g}")


TRANSFER_STEPS: tuple[Step, ...] = (_width, _tokens, _batch)


def tokens(cfg: RunConfig) -> int:
    return cfg.train.steps * cfg.train.batch_size * cfg.train.seq_len


def transfer(proxy: RunConfig, proxy_lr: float, *, width: int, steps: int | None = None,
             batch_size: int | None = None, depth: int | None = None,
             data_exponent: float = DATA_EXPONENT) -> TransferResult:
    """The target config (width, steps, batch) and its LR from the proxy's optimal LR."""
    if depth is not None and depth != proxy.model.depth:
        raise ConfigError("depth", depth, f"the proxy's depth {proxy.model.depth}: depth transfer "
                          "needs the depth rules (Depth-μP / CompleteP), which are not in this "
                          "version")
    if data_exponent < 0:
        raise ConfigError("data_exponent", data_exponent, "a non-negative exponent k")
    train = dataclasses.replace(
        proxy.train, steps=proxy.train.steps if steps is None else steps,
        batch_size=proxy.train.batch_size if batch_size is None else batch_size)
    target = dataclasses.replace(proxy, model=dataclasses.replace(proxy.model, width=width),
                                 train=train)
    validate(target)  # e.g. a width that is not a multiple of the head dim, or zero steps
    lr, reasons = proxy_lr, [f"proxy optimum: η = {proxy_lr:.4g} (log2 {math.log2(proxy_lr):.2f})"]
    for step in TRANSFER_STEPS:
        factor, reason = step(proxy, target, data_exponent)
        lr *= factor
        if reason is not None:
            reasons.append(reason)
    target = dataclasses.replace(target, optim=dataclasses.replace(proxy.optim, lr=lr))
    reasons.append(f"target: η = {lr:.4g} (log2 {math.log2(lr):.2f})")
    return TransferResult(target, lr, reasons, _role_multipliers(proxy, target))


def _role_multipliers(proxy: RunConfig, target: RunConfig) -> dict[str, tuple[float, float]]:
    before, after = (
        make_parametrization(c.model, c.param, proxy.data.vocab_size).optimizer_multipliers_for(
            c.optim)
        for c in (proxy, target))
    return {role: (before[role].lr, after[role].lr) for role in before}


def proxy_shape(analysis: dict, *, param: str | None = None, width: int | None = None) -> dict:
    """The analysed shape to transfer from: the widest with an interior optimum, unless told."""
    shapes = [s for s in analysis["shapes"] if s["optimum"] is not None]
    params = sorted({s["param"] for s in shapes})
    if param is None and len(params) > 1:
        raise ConfigError("param", None, f"one of {params}: the sweep holds several")
    shapes = [s for s in shapes if param is None or s["param"] == param]
    if not shapes:
        raise ConfigError("param", param, f"one of {params}")
    if width is not None:
        widths = sorted({s["width"] for s in shapes})
        shapes = [s for s in shapes if s["width"] == width]
        if not shapes:
            raise ConfigError("proxy_width", width, f"a swept width, one of {widths}")
    # an optimum on the grid's edge is a bound, not an optimum: prefer any interior one
    return max(shapes, key=lambda s: (not s["optimum"]["on_edge"], s["width"], s["tokens"]))


def proxy_config(results: list[dict], shape: dict) -> RunConfig:
    """The swept proxy's own config (tokens, base width, optimizer, …) of an analysed shape."""
    proxy = from_dict(next(r["config"] for r in results if shape_id(r["config"]) == shape["id"]))
    return dataclasses.replace(proxy, sweep=SweepConfig())


def transfer_from_sweep(results: list[dict], *, width: int, steps: int | None = None,
                        batch_size: int | None = None, param: str | None = None,
                        proxy_width: int | None = None,
                        data_exponent: float = DATA_EXPONENT) -> tuple[dict, TransferResult]:
    """(proxy shape, transfer) from a sweep's `result.json` dicts, as `scaling-transfer` does:
    the proxy is the analysed optimum's own run config, never a default config."""
    shape = proxy_shape(analyze(results), param=param, width=proxy_width)
    return shape, transfer(proxy_config(results, shape), shape["optimum"]["lr"], width=width,
                           steps=steps, batch_size=batch_size, data_exponent=data_exponent)
