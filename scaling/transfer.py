"""Transfer: the target's hyperparameters from a tuned proxy, by the parametrization's rules.

Each rule is one step that may move the base learning rate and says why. Width is handled by the
parametrization's table (μP moves per-group multipliers, never the base LR; SP has no rule). Depth
by the table too under Depth-μP and CompleteP (per-group multipliers, never the base LR), by
a base-LR law (scaling/laws.py) where the scheme's law, or the one chosen, has a depth
factor, and not at all under SP and μP. The law also sets the width factor on the base LR (0
but for the archscale reading of HyperP's law), the token exponent k (η ∝ T^(−k)) and the batch
exponent (η ∝ √(B/B0)).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

from scaling.analysis import analyze
from scaling.config import ConfigError, RunConfig, SweepConfig, from_dict, validate
from scaling.laws import LAWS, TABLES, LRLaw, Size
from scaling.parametrization import make_parametrization
from scaling.rules import NO_DEPTH_RULE
from scaling.schemes import WIDTH
from scaling.shapes import optim_label, shape_id


@dataclasses.dataclass(frozen=True)
class TransferResult:
    config: RunConfig  # the target run
    lr: float
    reasons: list[str]  # one line per rule, in the order applied
    # parameter group (a role, or a role inside residual blocks) -> (proxy, target) LR multiplier
    role_multipliers: dict[str, tuple[float, float]]
    law: LRLaw  # the base-LR law applied


Step = Callable[[RunConfig, RunConfig, LRLaw], tuple[float, str | None]]


def size(cfg: RunConfig) -> Size:
    return Size(cfg.model.width, cfg.model.depth, tokens(cfg), cfg.train.batch_size)


def _width(proxy: RunConfig, target: RunConfig, law: LRLaw) -> tuple[float, str | None]:
    w0, w, base = proxy.model.width, target.model.width, proxy.param.base_width
    scheme = proxy.param.scheme
    if w0 == w:
        return 1.0, None
    factor = law.factors(size(proxy), size(target))["width"]
    moved = (f"; the {law.name} law moves the base LR: η × (w0/w)^{law.width:g} = ×{factor:.4g}"
             if law.width else "")
    if WIDTH not in scheme.flat_in:
        return factor, (f"width {w0} → {w}: {scheme.label} has no width rule, so the base LR is "
                        f"copied (its optimum is expected to move with width){moved}")
    if not proxy.optim.needs_gradient:
        return factor, _zeroth_order_width(proxy.optim, w0, w) + moved
    claim = (f"; {scheme.label} claims its base LR transfers across width"
             if scheme.lr_law != TABLES and not law.width else "")
    stays = moved or f", the base LR stays{claim}"
    return factor, (f"width {w0} → {w} (m = {w0 / base:g} → {w / base:g} over base width {base}): "
                    f"the {scheme.name} table scales the per-group multipliers below{stays}")


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


def _depth(proxy: RunConfig, target: RunConfig, law: LRLaw) -> tuple[float, str | None]:
    l0, l, base = proxy.model.depth, target.model.depth, proxy.param.base_depth
    scheme = proxy.param.scheme
    if l0 == l:
        return 1.0, None
    if law.depth:
        factor = law.factors(size(proxy), size(target))["depth"]
        return factor, (f"depth {l0} → {l} blocks: {scheme.label} under the {law.name} law, "
                        f"η × (L0/L)^"
                        f"{law.depth:g} = ×{factor:.4g} (the depth exponent is an assumption "
                        "to measure)")
    if scheme.depth == NO_DEPTH_RULE:
        return 1.0, (f"depth {l0} → {l} blocks: {scheme.label} has no depth rule, so the "
                     "base LR is copied (its optimum is expected to move with depth)")
    if scheme.depth.branch.absolute:  # HyperP: branches × 1/√(2L), no per-group depth rule
        return 1.0, (f"depth {l0} → {l} blocks: {scheme.label}'s branches scale with depth; the "
                     f"{law.name} law has no depth factor, so the base LR is copied")
    alpha = -scheme.depth.branch.c
    return 1.0, (f"depth {l0} → {l} blocks (r = {l0 / base:g} → {l / base:g} over base depth "
                 f"{base}, α = {alpha:g}): the {scheme.name} table scales the per-group "
                 f"multipliers below (branches × r^(−α), block LR × r^(α−1)), the base LR stays")


def _tokens(proxy: RunConfig, target: RunConfig, law: LRLaw) -> tuple[float, str | None]:
    t0, t = tokens(proxy), tokens(target)
    if t0 == t:
        return 1.0, None
    factor = law.factors(size(proxy), size(target))["tokens"]
    return factor, f"tokens {t0:,} → {t:,} (×{t / t0:g}): η × (T/T0)^(−{law.data:g}) = ×{factor:.4g}"


def _batch(proxy: RunConfig, target: RunConfig, law: LRLaw) -> tuple[float, str | None]:
    b0, b = proxy.train.batch_size, target.train.batch_size
    if b0 == b:
        return 1.0, None
    factor = law.factors(size(proxy), size(target))["batch"]
    return factor, (f"batch {b0} → {b} sequences (×{b / b0:g}): "
                    f"η × (B/B0)^{law.batch:g} = ×{factor:.4g}")


TRANSFER_STEPS: tuple[Step, ...] = (_width, _depth, _tokens, _batch)


def tokens(cfg: RunConfig) -> int:
    return cfg.train.steps * cfg.train.batch_size * cfg.train.seq_len


def chosen_law(proxy: RunConfig, law: str | None = None, *, data_exponent: float | None = None,
               depth_exponent: float | None = None,
               width_exponent: float | None = None) -> LRLaw:
    """The law named `law` (None: the one the proxy's scheme names for its optimizer), with
    any exponent given replacing its own."""
    if law is not None and law not in LAWS:
        raise ConfigError("law", law, f"one of {list(LAWS)}")
    chosen = proxy.param.scheme.law_for(proxy.optim.name) if law is None else LAWS[law]
    given = {"data": data_exponent, "depth": depth_exponent, "width": width_exponent}
    for axis, value in given.items():
        if value is not None and not value >= 0:
            raise ConfigError(f"{axis}_exponent", value, "a non-negative exponent")
    return dataclasses.replace(chosen, **{k: v for k, v in given.items() if v is not None})


def transfer(proxy: RunConfig, proxy_lr: float, *, width: int | None = None,
             depth: int | None = None, steps: int | None = None, batch_size: int | None = None,
             law: str | None = None, data_exponent: float | None = None,
             depth_exponent: float | None = None,
             width_exponent: float | None = None) -> TransferResult:
    """The target config (width, depth, steps, batch; None keeps the proxy's) and its LR from
    the proxy's optimal LR, by the base-LR law `law` (a name in LAWS; None: the scheme's own)
    with any exponent given replacing the law's. An absolute Adam LR (optim.adam_lr) moves
    by the same factor as the base LR."""
    chosen = chosen_law(proxy, law, data_exponent=data_exponent, depth_exponent=depth_exponent,
                        width_exponent=width_exponent)
    model = dataclasses.replace(proxy.model, width=proxy.model.width if width is None else width,
                                depth=proxy.model.depth if depth is None else depth)
    train = dataclasses.replace(
        proxy.train, steps=proxy.train.steps if steps is None else steps,
        batch_size=proxy.train.batch_size if batch_size is None else batch_size)
    target = dataclasses.replace(proxy, model=model, train=train)
    validate(target)  # e.g. a width that is not a multiple of the head dim, or zero steps
    lr, reasons = proxy_lr, [f"proxy optimum: η = {proxy_lr:.4g} (log2 {math.log2(proxy_lr):.2f})"]
    for step in TRANSFER_STEPS:
        factor, reason = step(proxy, target, chosen)
        lr *= factor
        if reason is not None:
            reasons.append(reason)
    optim = dataclasses.replace(proxy.optim, lr=proxy_lr).scaled_lr(lr / proxy_lr)
    target = dataclasses.replace(target, optim=optim)
    reasons.append(f"target: η = {lr:.4g} (log2 {math.log2(lr):.2f})")
    return TransferResult(target, lr, reasons, _role_multipliers(proxy, target), chosen)


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
    """The analysis's tunes that pass through `shape` (one per tuned field)."""
    return [t for t in analysis.get("tunes", []) if shape["id"] in t["shape_ids"]]


# what a transfer does to a tuned value, by the config group that holds it
CARRIED = {"param": "carried unchanged, as the table scales its role with width",
           "optim": "moved by the same law as the base LR"}


def _tuned_reasons(tunes: list[dict], proxy_lr: float) -> list[str]:
    reasons = []
    for t in tunes:
        o = t["optimum"]
        edge = ", ON THE GRID EDGE: widen its grid" if o["on_edge"] else ""
        path = t.get("path", f"param.{t['field']}")
        reasons.append(f"{path} = {o['value']:.4g}: tuned on the proxy against the LR (joint "
                       f"optimum at log2 lr {o['log2_lr']:.2f}, loss {o['loss']:.4f}{edge}); "
                       f"{CARRIED[path.split('.')[0]]}")
    if len(tunes) > 1:
        reasons.append(f"the {len(tunes)} multipliers were each tuned with the others held; the "
                       f"base LR is the proxy's optimum at their centre (log2 "
                       f"{math.log2(proxy_lr):.2f}): confirm the combination with an LR sweep at "
                       "the proxy")
    elif tunes:
        reasons.append("the base LR is the joint optimum's")
    return reasons


def _with_tuned(proxy: RunConfig, tunes: list[dict]) -> RunConfig:
    """The proxy with each tuned field at its optimum, in the group that holds it."""
    for t in tunes:
        group, field = t.get("path", f"param.{t['field']}").split(".")
        proxy = dataclasses.replace(proxy, **{group: dataclasses.replace(
            getattr(proxy, group), **{field: t["optimum"]["value"]})})
    return proxy


def proxy_config(results: list[dict], shape: dict) -> RunConfig:
    """The swept proxy's own config (tokens, base width, optimizer, …) of an analysed shape."""
    proxy = from_dict(next(r["config"] for r in results if shape_id(r["config"]) == shape["id"]))
    return dataclasses.replace(proxy, sweep=SweepConfig())


def transfer_from_sweep(results: list[dict], *, width: int | None = None,
                        depth: int | None = None, steps: int | None = None,
                        batch_size: int | None = None, param: str | None = None,
                        proxy_width: int | None = None, proxy_depth: int | None = None,
                        law: str | None = None, data_exponent: float | None = None,
                        depth_exponent: float | None = None,
                        width_exponent: float | None = None,
                        optim: str | None = None) -> tuple[dict, TransferResult]:
    """(proxy shape, transfer) from a sweep's `result.json` dicts, as `scaling-transfer` does:
    the proxy is the analysed optimum's own run config, never a default config."""
    analysis = analyze(results)
    shape = proxy_shape(analysis, param=param, width=proxy_width, depth=proxy_depth, optim=optim)
    proxy, proxy_lr = proxy_config(results, shape), shape["optimum"]["lr"]
    tunes = tuned_multipliers(analysis, shape)
    proxy = _with_tuned(proxy, tunes)  # each tuned value replaces the shape's own
    if len(tunes) == 1:  # the LR at the tuned value, not at the shape's
        proxy_lr = tunes[0]["optimum"]["lr"]
    result = transfer(proxy, proxy_lr, width=width, depth=depth, steps=steps,
                      batch_size=batch_size, law=law, data_exponent=data_exponent,
                      depth_exponent=depth_exponent, width_exponent=width_exponent)
    reasons = [*result.reasons[:1], *_tuned_reasons(tunes, proxy_lr), *result.reasons[1:]]
    return shape, dataclasses.replace(result, reasons=reasons)
