"""Learning-rate laws: how a tuned base LR moves from a proxy to a target of another size.

A law is one formula, η_target = η_proxy · (w0/w)^a · (L0/L)^d · (T/T0)^(−k) · (B/B0)^b, on top
of whatever the parametrization's tables do to the per-group multipliers. Each scheme names the
law `scaling-transfer` applies by default (scaling/schemes.py); `--law` picks another, and the
sweep analysis reports how far each law leaves a joint width–depth path's optimum from flat.
docs/sweeps-and-transfer.md measures which one holds where.
"""

from __future__ import annotations

import dataclasses
import math

DATA_EXPONENT = 0.32  # k in η ∝ T^(−k), HyperP's fit (ArchScale)
BATCH_EXPONENT = 0.5  # η ∝ √(B/B0)


@dataclasses.dataclass(frozen=True)
class Size:
    """What a law reads of a run: its width (d_model), depth (blocks), tokens and batch."""

    width: int
    depth: int
    tokens: int
    batch_size: int


@dataclasses.dataclass(frozen=True)
class LRLaw:
    """η × (w0/w)^width × (L0/L)^depth × (T/T0)^(−data) × (B/B0)^batch."""

    name: str  # scaling-transfer --law NAME
    description: str  # what the law says and where it comes from
    width: float = 0.0
    depth: float = 0.0
    data: float = DATA_EXPONENT
    batch: float = BATCH_EXPONENT

    def factors(self, proxy: Size, target: Size) -> dict[str, float]:
        """The factor on η along each axis the law reads (1 where the size does not change)."""
        return {"width": (proxy.width / target.width) ** self.width,
                "depth": (proxy.depth / target.depth) ** self.depth,
                "tokens": (target.tokens / proxy.tokens) ** -self.data,
                "batch": (target.batch_size / proxy.batch_size) ** self.batch}

    def log2_factor(self, proxy: Size, target: Size) -> float:
        return sum(math.log2(f) for f in self.factors(proxy, target).values())


TABLES = LRLaw("tables", "the parametrization's tables move the per-group multipliers; the base "
               "LR moves only with tokens and batch")
DEPTH_SQRT = LRLaw("depth_sqrt", "HyperP's depth factor read as depth alone: η × √(L0/L) at any "
                   "width, with tokens and batch", depth=0.5)
ARCHSCALE = LRLaw("archscale", "HyperP's global law as its reference code applies it (ArchScale, "
                  "Microsoft): η0·√(B/B0)·√(d0/d)·(T/T0)^−0.32 with d the model width, fitted "
                  "on a path where width = 128·depth; no separate depth factor", width=0.5)

MUON_MEASURED = LRLaw("muon_measured", "μP + Muon's optimum as measured on this project's width "
                      "sweeps (bytes and BPE-4k, tied or fixed Adam LR, widths 64→256): "
                      "η × (w0/w)^0.27", width=0.27)

LAWS: dict[str, LRLaw] = {law.name: law for law in (TABLES, DEPTH_SQRT, ARCHSCALE, MUON_MEASURED)}
