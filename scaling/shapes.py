"""What a sweep's runs are grouped by: a shape is a run config without its LR, seed and
bookkeeping; a family of shapes differs only in the fields one analysis varies."""

from __future__ import annotations

import copy
import hashlib
import json

from scaling.rules import TUNABLE

# What a sweep varies within one shape (LR, seed) and bookkeeping that does not change training.
NOT_SHAPE = ("optim.lr", "train.seed", "logging", "sweep", "train.out_dir", "train.eval_every",
             "train.log_every", "train.checkpoint_every")
# MeZO's probe and update scalings, part of a MeZO family's identity: they set how its optimum
# moves with width, so isotropic and matched runs are never one family.
PROBE_FIELDS = ("probe_scaling", "update_scaling")


def config_id(config: dict, drop: tuple[str, ...]) -> str:
    """Short hash of a run config without the dotted fields in `drop`."""
    kept = copy.deepcopy(config)
    for field in drop:
        *parents, leaf = field.split(".")
        node = kept
        for parent in parents:
            node = node.get(parent, {})
        node.pop(leaf, None)
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:8]


def shape_id(config: dict) -> str:
    """The id of the shape a run belongs to: its config without LR, seed and bookkeeping."""
    return config_id(config, NOT_SHAPE)


def probes(optim: dict) -> str | None:
    """The probe scaling of an optimizer that has one, MeZO's ('matched'; 'D=matched,U=isotropic'
    where probe and update differ); None for an optimizer without those fields."""
    if not all(field in optim for field in PROBE_FIELDS):
        return None
    probe, update = (optim[field] for field in PROBE_FIELDS)
    return probe if probe == update else f"D={probe},U={update}"


def optim_label(entry: dict) -> str:
    """A shape's or family's optimizer as tables print it: 'adamw', 'mezo[matched]'."""
    return entry["optim"] + (f"[{entry['probes']}]" if entry.get("probes") else "")


def family_of(shape: dict, fields: tuple[str, ...]) -> dict:
    """The shape's values of `fields`, and its MeZO probe scaling where it has one."""
    family = {k: shape[k] for k in fields}
    if "probes" in shape:
        family["probes"] = shape["probes"]
    return family


def multipliers(config: dict) -> dict[str, float]:
    """A run config's tunable multipliers; 1 for a config written before they existed."""
    return {field: float(config["param"].get(field, 1.0)) for field in TUNABLE}


def tuned_label(values: dict[str, float]) -> str:
    """The multipliers that are not 1, as `output_mult=2 attn_mult=0.5`; '' when none."""
    return " ".join(f"{field}={value:g}" for field, value in values.items() if value != 1.0)
