"""What a sweep's runs are grouped by: a shape is a run config without its LR, seed and
bookkeeping; a family of shapes differs only in the fields one analysis varies."""

from __future__ import annotations

import copy
import hashlib
import json

from models.config import BLOCK_OPTIONS, ModelConfig
from scaling.rules import TUNABLE

# What a sweep varies within one shape (LR, seed) and bookkeeping that does not change training.
NOT_SHAPE = ("optim.lr", "train.seed", "logging", "sweep", "train.out_dir", "train.eval_every",
             "train.log_every", "train.checkpoint_every", "train.grad_accum")
# MeZO's probe and update scalings, part of a MeZO family's identity: they set how its optimum
# moves with width, so isotropic and matched runs are never one family.
PROBE_FIELDS = ("probe_scaling", "update_scaling")


# Fields added after runs were finished: left out of run hashes and shape ids at their defaults,
# so those runs keep their directories and share shapes with runs that spell the default out.
LATER_DEFAULTS = {("data", "packages"): "all", ("data", "tokenizer"): "bytes",
                  ("data", "text_field"): "text", ("init", "from_run"): None,
                  ("optim", "clip_scope"): "global", ("optim", "clip_width_exponent"): 0.0,
                  ("optim", "ns_sharding"): "stack", ("optim", "adam_lr"): None,
                  ("optim", "sphere_norm"): "frobenius",
                  ("optim", "warmup_fraction"): 0.05, ("model", "factory"): None,
                  **{("model", name): getattr(ModelConfig(), name) for name in BLOCK_OPTIONS},
                  **{("param", field): 1.0 for field in TUNABLE}}


def without_later_defaults(config: dict) -> dict:
    """A copy of a run config (as a dict) without the LATER_DEFAULTS fields at their defaults
    (some optimizers lack some fields: a missing field counts as its default)."""
    values = _old_defaults(config)
    for (group, field), default in LATER_DEFAULTS.items():
        if group in values and values[group].get(field, default) == default:
            values[group].pop(field, None)
    return values


def with_later_defaults(config: dict) -> dict:
    """A copy of a run config (as a dict) with every LATER_DEFAULTS field its group lacks set
    to its default, so a run from before a field existed reads as the default's."""
    values = _old_defaults(config)
    for (group, field), default in LATER_DEFAULTS.items():
        if group in values and field not in values[group]:
            values[group][field] = default
    return values


# Defaults that became None (the data decides: data.dtype is a .bin sidecar's, else uint16): None
# reads as the old default in run hashes and shape ids, so runs from before keep both.
OLD_DEFAULTS = {("data", "dtype"): "uint16"}


def _old_defaults(config: dict) -> dict:
    """A copy of a run config (as a dict) with each OLD_DEFAULTS field that is None set to it."""
    values = copy.deepcopy(config)
    for (group, field), old in OLD_DEFAULTS.items():
        if values.get(group, {}).get(field, old) is None:
            values[group][field] = old
    return values


def config_id(config: dict, drop: tuple[str, ...]) -> str:
    """Short hash of a run config without the dotted fields in `drop` (and without fields that
    were added later and hold their defaults)."""
    kept = without_later_defaults(config)
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
    """The shape's values of `fields`, and where it has them its MeZO probe scaling, absolute
    Adam LR and setting (scaling.analysis: the other fields that differ within its recipe)."""
    family = {k: shape[k] for k in fields}
    if "probes" in shape:
        family["probes"] = shape["probes"]
    if shape.get("adam_lr") is not None:
        family["adam_lr"] = shape["adam_lr"]
    if shape.get("setting"):  # the other config fields that differ within its recipe
        family["setting"] = shape["setting"]
    return family


def multipliers(config: dict) -> dict[str, float]:
    """A run config's tunable multipliers; 1 for a config written before they existed."""
    return {field: float(config["param"].get(field, 1.0)) for field in TUNABLE}


def tuned_label(values: dict[str, float]) -> str:
    """The multipliers that are not 1, as `output_mult=2 attn_mult=0.5`; '' when none."""
    return " ".join(f"{field}={value:g}" for field, value in values.items() if value != 1.0)


def setting_label(shape: dict) -> str:
    """What a shape tunes besides the LR: its multipliers that are not 1 and its absolute Adam
    LR, as `output_mult=2 adam_lr=0.03125`; '' when none."""
    adam = "" if shape.get("adam_lr") is None else f"adam_lr={shape['adam_lr']:g}"
    return " ".join(part for part in (tuned_label(shape.get("multipliers", {})), adam) if part)
