"""Fields tuned on the proxy against the LR: the per-role multipliers (scaling/rules.py TUNABLE)
and a matrix optimizer's Adam LR (optim.adam_lr, absolute). From a sweep of LR × one field (the
others held fixed), the 2-D optimum, and how each of its two coordinates moves with width.

The joint optimum is found on the profile: each multiplier value's best loss over the LR grid (the
per-shape LR fit), then the vertex of a quadratic in log2 multiplier through those best losses,
and the LR optimum interpolated to that multiplier. For a loss quadratic in (log2 LR, log2
multiplier) this is the exact optimum, whatever the correlation between the two.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from scaling.fits import fit_optimum
from scaling.rules import TUNABLE
from scaling.shapes import NOT_SHAPE, config_id, family_of, tuned_label

# A tune needs a curve in the multiplier with an interior minimum to fit: three values at least.
MIN_VALUES = 3
# field -> its dotted config path: the multipliers, and the Adam LR of a matrix optimizer (which
# a run without it trains at lr * adam_lr_ratio: such a run is no point of the tune)
TUNED_FIELDS: dict[str, str] = {**{f: f"param.{f}" for f in TUNABLE}, "adam_lr": "optim.adam_lr"}


def tuned_value(shape: dict, field: str) -> float | None:
    """The shape's value of a tuned field; None where it has none (a tied Adam LR)."""
    return shape["multipliers"][field] if field in shape["multipliers"] else shape.get(field)
TUNE_FIELDS = ("param", "optim", "kind", "width", "depth", "tokens", "batch_size")


def tunes(shapes: list[tuple[dict, dict]]) -> list[dict]:
    """One tune per tuned field and family of shapes that differ only in that field (and the
    LR and seed), over at least MIN_VALUES values with an optimum each."""
    out = []
    for field, dotted in TUNED_FIELDS.items():
        groups = defaultdict(list)
        for shape, config in shapes:
            if shape["optimum"] is not None and tuned_value(shape, field) is not None:
                groups[config_id(config, NOT_SHAPE + (dotted,))].append(shape)
        for members in groups.values():
            if len({tuned_value(m, field) for m in members}) >= MIN_VALUES:
                out.append(_tune(field, sorted(members, key=lambda m: tuned_value(m, field))))
    # sizes as numbers (64 before 128), names as text
    return sorted(out, key=lambda t: (t["field"], *(str(t["family"][f]) for f in TUNE_FIELDS[:3]),
                                      *(t["family"][f] for f in TUNE_FIELDS[3:])))


def _tune(field: str, members: list[dict]) -> dict:
    values = [tuned_value(m, field) for m in members]
    log2_values = [math.log2(v) for v in values]
    log2_lr = [m["optimum"]["log2_lr"] for m in members]
    losses = [m["optimum"]["loss"] for m in members]
    best = fit_optimum(log2_values, losses)
    joint_log2_lr = float(np.interp(best.log2_lr, log2_values, log2_lr))
    others = {f: v for f, v in members[0]["multipliers"].items() if f != field and v != 1.0}
    return {"field": field, "path": TUNED_FIELDS[field],
            "family": family_of(members[0], TUNE_FIELDS), "others": others,
            "shape_ids": [m["id"] for m in members], "values": values, "log2_values": log2_values,
            "log2_lr": log2_lr, "loss": losses,
            "optimum": {"log2_value": best.log2_lr, "value": 2.0**best.log2_lr,
                        "argmin_log2_value": best.argmin_log2_lr, "log2_lr": joint_log2_lr,
                        "lr": 2.0**joint_log2_lr, "loss": best.loss, "on_edge": best.on_edge,
                        "fitted": best.fitted},
            # the loss surface for contours: per value, (log2 lr, seed-mean loss) on its LR grid
            "curves": [[(p["log2_lr"], p["mean"]) for p in m["curve"]] for m in members]}


def multiplier_drift(all_tunes: list[dict]) -> list[dict]:
    """How each tune's optimum moves with width, over tunes equal in everything else: the tuned
    field's value and, on its own, the LR of the joint optimum."""
    families = defaultdict(list)
    for tune in all_tunes:
        key = (tune["field"], *(str(tune["family"][f]) for f in TUNE_FIELDS if f != "width"),
               tuple(sorted(tune["others"].items())))
        families[key].append(tune)
    out = []
    for members in families.values():
        if len(members) < 2:
            continue
        members.sort(key=lambda t: t["family"]["width"])
        widths = [t["family"]["width"] for t in members]
        log2_values = [t["optimum"]["log2_value"] for t in members]
        log2_lr = [t["optimum"]["log2_lr"] for t in members]
        out.append({"field": members[0]["field"],
                    "family": {k: v for k, v in members[0]["family"].items() if k != "width"},
                    "widths": widths, "log2_value": log2_values,
                    "drift_octaves": max(log2_values) - min(log2_values),
                    "slope": float(np.polyfit(np.log2(widths), log2_values, 1)[0]),
                    "log2_lr": log2_lr, "lr_drift_octaves": max(log2_lr) - min(log2_lr),
                    "lr_slope": float(np.polyfit(np.log2(widths), log2_lr, 1)[0]),
                    "any_on_edge": any(t["optimum"]["on_edge"] for t in members)})
    return out


def tune_lines(analysis: dict) -> list[str]:
    """One line per tune (its joint optimum) and per multiplier drift, for format_table."""
    lines = []
    for t in analysis.get("tunes", []):
        f, o = t["family"], t["optimum"]
        edge = "  (ON THE GRID EDGE: widen the multiplier grid)" if o["on_edge"] else ""
        held = f" with {tuned_label(t['others'])}" if t["others"] else ""
        lines.append(f"{f['param']} {f['optim']} w{f['width']} d{f['depth']} {f['tokens']} tokens"
                     f"{held}: {t['field']} = {o['value']:.3g} (log2 {o['log2_value']:+.2f}) at "
                     f"log2 lr {o['log2_lr']:.2f}, loss {o['loss']:.4f}{edge}")
    for d in analysis.get("multiplier_drift", []):
        f = d["family"]
        edge = "  (an optimum is on the grid edge)" if d["any_on_edge"] else ""
        lines.append(f"{f['param']} {f['optim']} d{f['depth']} {d['field']} "
                     f"w{d['widths'][0]}→w{d['widths'][-1]}: drift {d['drift_octaves']:.2f} "
                     f"octaves, slope {d['slope']:+.2f}/width-octave; the joint optimum's LR: "
                     f"drift {d['lr_drift_octaves']:.2f}, slope {d['lr_slope']:+.2f}{edge}")
    return lines
