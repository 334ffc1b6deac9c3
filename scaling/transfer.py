"""Transfer: the target's hyperparameters from a tuned proxy, by the parametrization's rules.

Each rule is one step that may move the base learning rate and says why. Width is handled by the
parametrization's table (μP moves per-group multipliers, never the base LR; SP has no rule). Depth
by the table too under Depth-μP and CompleteP (per-group multipliers, never the base LR), by
HyperP's law η ∝ (L0/L)^d (d, the depth exponent, an assumption to measure), and not at all
under SP and μP. The token budget by the data-scaling law η ∝ T^(−k), the batch by η ∝ √(B/B0).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

from scaling.analysis import analyze
from scaling.config import ConfigError, RunConfig, SweepConfig, from_dict, validate
from scaling.parametrization import make_parametrization
from scaling.rules import NO_DEPTH_RULE
from scaling.schemes import WIDTH
from scaling.shapes import optim_label, shape_id

DATA_EXPONENT = 0.32  # k in η ∝ T^(−k), fitted by HyperP (ArchScale)
BATCH_EXPONENT = 0.5  # η ∝ √(B/B0), HyperP's batch rule
# d in HyperP's η ∝ (L0/L)^d. ArchScale grew width with depth, so its √(L0/L) is not separable
# from width: an assumption to measure (docs/rules.md: HyperP), hence configurable.
DEPTH_EXPONENT = 0.5


@dataclasses.dataclass(frozen=True)
class TransferResult:
    config: RunConfig  # the target run
    lr: float
    reasons: list[str]  # one line per rule, in the order applied
    # parameter group (a role, or a role inside residual blocks) -> (proxy, target) LR multiplier
    role_multipliers: dict[str, tuple[float, float]]


@dataclasses.dataclass(frozen=True)
class Exponents:
    """The exponents of the LR laws a transfer applies (the others are fixed rules)."""

    data: float = DATA_EXPONENT  # k in η ∝ T^(−k)
    depth: float = DEPTH_EXPONENT  # d in HyperP's η ∝ (L0/L)^d


Step = Callable[[RunConfig, RunConfig, Exponents], tuple[float, str | None]]


def _width(proxy: RunConfig, target: RunConfig, laws: Exponents) -> tuple[float, str | None]:
    w0, w, base = proxy.model.width, target.model.width, proxy.param.base_width
    scheme = proxy.param.scheme
    if w0 == w:
        return 1.0, None
    if WIDTH not in scheme.flat_in:
        return 1.0, (f"width {w0} → {w}: {scheme.label} has no width rule, so the base LR is "
                     "copied (its optimum is expected to move with width)")
    if not proxy.optim.needs_gradient:
        return 1.0, _zeroth_order_width(proxy.optim, w0, w)
    claim = (f"; {scheme.label} claims its base LR transfers across width"
             if scheme.depth_lr_law else "")
    return 1.0, (f"width {w0} → {w} (m = {w0 / base:g} → {w / base:g} over base width {base}): "
                 f"the {scheme.name} table scales the per-group multipliers below, "
                 f"the base LR stays{claim}")


def _zeroth_order_width(optim, w0: int, w: int) -> str:
    """MeZO reads the table only through matched probe and update scales."""
    matched = [f"optim.{f}" for f in ("probe_scaling", "update_scaling")
               if getattr(optim, f) == "matched"]
    if not matched:
        return (f"width {w0} → {w}: MeZO with isotropic probes takes none of the table's "
                "multipliers, so the base LR is copied (measured under μP over widths 32→256: "
                "its optimum stayed within noise; docs/sweeps-and-transfer.md)")
    return (f"width {w0} → {w}: {' and '.join(matched)}=matched follow the table's SGD "
            "multipliers below, the base LR stays (measured over widths 32→256: the optimum "
            "fell about half an octave per width doubling; docs/sweeps-and-transfer.md)")


def _depth(proxy: RunConfig, target: RunConfig, laws: Exponents) -> tuple[float, str | None]:
    l0, l, base = proxy.model.depth, target.model.depth, proxy.param.base_depth
    scheme = proxy.param.scheme
    if l0 == l:
        return 1.0, None
    if scheme.depth_lr_law:
        factor = (l0 / l) ** laws.depth
        return factor, (f"depth {l0} → {l} blocks: {scheme.label}'s η × (L0/L)^"
                        f"{laws.depth:g} = ×{factor:.4g} (the depth exponent is an assumption "
                        "to measure)")
    if scheme.depth == NO_DEPTH_RULE:
        return 1.0, (f"depth {l0} → {l} blocks: {scheme.label} has no depth rule, so the "
                     "base LR is copied (its optimum is expected to move with depth)")
    alpha = -scheme.depth.branch.c
    return 1.0, (f"depth {l0} → {l} blocks (r = {l0 / base:g} → {l / base:g} over base depth "
                 f"{base}, α = {alpha:g}): the {scheme.name} table scales the per-group "
                 f"multipliers below (branches × r^(−α), block LR × r^(α−1)), the base LR stays")


def _tokens(proxy: RunConfig, target: RunConfig, laws: Exponents) -> tuple[float, str | None]:
    t0, t, k = tokens(proxy), tokens(target), laws.data
    if t0 == t:
        return 1.0, None
    factor = (t / t0) ** -k
    return factor, f"tokens {t0:,} → {t:,} (×{t / t0:g}): η × (T/T0)^(−{k:g}) = ×{factor:.4g}"


def _batch(proxy: RunConfig, target: RunConfig, laws: Exponents) -> tuple[float, str | None]:
    b0, b = proxy.train.batch_size, target.train.batch_size
    if b0 == b:
        return 1.0, None
    factor = (b / b0) ** BATCH_EXPONENT
    return factor, (f"batch {b0} → {b} sequences (×{b / b0:g}): "
                    f"η × (B/B0)^{BATCH_EXPONENT:g} = ×{factor:.4g}")


TRANSFER_STEPS: tuple[Step, ...] = (_width, _depth, _tokens, _batch)


def tokens(cfg: RunConfig) -> int:
    return cfg.train.steps * cfg.train.batch_size * cfg.train.seq_len


def transfer(proxy: RunConfig, proxy_lr: float, *, width: int | None = None,
             depth: int | None = None, steps: int | None = None, batch_size: int | None = None,
             data_exponent: float = DATA_EXPONENT,
             depth_exponent: float = DEPTH_EXPONENT) -> TransferResult:
    """The target config (width, depth, steps, batch; None keeps the proxy's) and its LR from
    the proxy's optimal LR."""
    if data_exponent < 0:
        raise ConfigError("data_exponent", data_exponent, "a non-negative exponent k")
    if depth_exponent < 0:
        raise ConfigError("depth_exponent", depth_exponent, "a non-negative exponent d")
    model = dataclasses.replace(proxy.model, width=proxy.model.width if width is None else width,
                                depth=proxy.model.depth if depth is None else depth)
    train = dataclasses.replace(
        proxy.train, steps=proxy.train.steps if steps is None else steps,
        batch_size=proxy.train.batch_size if batch_size is None else batch_size)
    target = dataclasses.replace(proxy, model=model, train=train)
    validate(target)  # e.g. a width that is not a multiple of the head dim, or zero steps
    laws = Exponents(data=data_exponent, depth=depth_exponent)
    lr, reasons = proxy_lr, [f"proxy optimum: η = {proxy_lr:.4g} (log2 {math.log2(proxy_lr):.2f})"]
    for step in TRANSFER_STEPS:
        factor, reason = step(proxy, target, laws)
        lr *= factor
        if reason is not None:
            reasons.append(reason)
    target = dataclasses.replace(target, optim=dataclasses.replace(proxy.optim, lr=lr))
    reasons.append(f"target: η = {lr:.4g} (log2 {math.log2(lr):.2f})")
    return TransferResult(target, lr, reasons, _role_multipliers(proxy, target))


def _role_multipliers(proxy: RunConfig, target: RunConfig) -> dict[str, tuple[float, float]]:
    def lr_multipliers(c: RunConfig) -> dict[str, float]:
        """Each group's LR factor of its expected step (MeZO's: D·U)."""
        parametrization = make_parametrization(c.model, c.param, proxy.data.vocab_size)
        return {group: c.optim.step_lr_multiplier(m.lr) for group, m in
                parametrization.optimizer_multipliers(c.optim).items()}

    before, after = lr_multipliers(proxy), lr_multipliers(target)
    return {role: (before[role], after[role]) for role in before}


def proxy_shape(analysis: dict, *, param: str | None = None, width: int | None = None,
                depth: int | None = None, optim: str | None = None) -> dict:
    """The analysed shape to transfer from: the widest, then deepest, with an interior optimum,
    unless told its width or depth. `optim` picks the optimizer where the sweep holds several,
    as the tables name it ('adamw', 'mezo[matched]')."""
    shapes = [s for s in analysis["shapes"] if s["optimum"] is not None]
    params = sorted({s["param"] for s in shapes})
    if param is None and len(params) > 1:
        raise ConfigError("param", None, f"one of {params}: the sweep holds several")
    shapes = [s for s in shapes if param is None or s["param"] == param]
    if not shapes:
        raise ConfigError("param", param, f"one of {params}")
    optims = sorted({optim_label(s) for s in shapes})
    if optim is None and len(optims) > 1:
        raise ConfigError("optim", None, f"one of {optims}: the sweep holds several")
    shapes = [s for s in shapes if optim is None or optim_label(s) == optim]
    if not shapes:
        raise ConfigError("optim", optim, f"one of {optims}")
    for axis, size in (("width", width), ("depth", depth)):
        if size is not None:
            sizes = sorted({s[axis] for s in shapes})
            shapes = [s for s in shapes if s[axis] == size]
            if not shapes:
                raise ConfigError(f"proxy_{axis}", size, f"a swept {axis}, one of {sizes}")
    # an optimum on the grid's edge is a bound, not an optimum: prefer any interior one; among
    # a multiplier tune's shapes, the centre (the multipliers nearest 1), which every tune shares
    return max(shapes, key=lambda s: (not s["optimum"]["on_edge"], s["width"], s["depth"],
                                      s["tokens"], -_distance_from_one(s)))


def _distance_from_one(shape: dict) -> float:
    return sum(abs(math.log2(v)) for v in shape.get("multipliers", {}).values())


def tuned_multipliers(analysis: dict, shape: dict) -> list[dict]:
    """The analysis's multiplier tunes that pass through `shape` (one per multiplier field)."""
    return [t for t in analysis.get("tunes", []) if shape["id"] in t["shape_ids"]]


def _tuned_reasons(tunes: list[dict], proxy_lr: float) -> list[str]:
    reasons = []
    for t in tunes:
        o = t["optimum"]
        edge = ", ON THE GRID EDGE: widen its grid" if o["on_edge"] else ""
        reasons.append(f"param.{t['field']} = {o['value']:.4g}: tuned on the proxy against the "
                       f"LR (joint optimum at log2 lr {o['log2_lr']:.2f}, loss {o['loss']:.4f}"
                       f"{edge}); carried unchanged, as the table scales its role with width")
    if len(tunes) > 1:
        reasons.append(f"the {len(tunes)} multipliers were each tuned with the others held; the "
                       f"base LR is the proxy's optimum at their centre (log2 "
                       f"{math.log2(proxy_lr):.2f}): confirm the combination with an LR sweep at "
                       "the proxy")
    return reasons


def proxy_config(results: list[dict], shape: dict) -> RunConfig:
    """The swept proxy's own config (tokens, base width, optimizer, …) of an analysed shape."""
    proxy = from_dict(next(r["config"] for r in results if shape_id(r["config"]) == shape["id"]))
    return dataclasses.replace(proxy, sweep=SweepConfig())


def transfer_from_sweep(results: list[dict], *, width: int | None = None,
                        depth: int | None = None, steps: int | None = None,
                        batch_size: int | None = None, param: str | None = None,
                        proxy_width: int | None = None, proxy_depth: int | None = None,
                        data_exponent: float = DATA_EXPONENT,
                        depth_exponent: float = DEPTH_EXPONENT,
                        optim: str | None = None) -> tuple[dict, TransferResult]:
    """(proxy shape, transfer) from a sweep's `result.json` dicts, as `scaling-transfer` does:
    the proxy is the analysed optimum's own run config, never a default config."""
    analysis = analyze(results)
    shape = proxy_shape(analysis, param=param, width=proxy_width, depth=proxy_depth, optim=optim)
    proxy, proxy_lr = proxy_config(results, shape), shape["optimum"]["lr"]
    tunes = tuned_multipliers(analysis, shape)
    if tunes:  # every tuned multiplier replaces the centre's value in the proxy's config
        proxy = dataclasses.replace(proxy, param=dataclasses.replace(
            proxy.param, **{t["field"]: t["optimum"]["value"] for t in tunes}))
    result = transfer(proxy, proxy_lr, width=width, depth=depth, steps=steps,
                      batch_size=batch_size, data_exponent=data_exponent,
                      depth_exponent=depth_exponent)
    reasons = [*result.reasons[:1], *_tuned_reasons(tunes, proxy_lr), *result.reasons[1:]]
    return shape, dataclasses.replace(result, reasons=reasons)
