"""MeZO's probe plan from a parametrization: which leaves are stacked, and the per-group probe,
update and ε scales that width-aware MeZO reads from the rule tables."""

from __future__ import annotations

import math

from models.tagged import ParamSpec, tree_from_paths
from optim.config import MeZOConfig
from optim.mezo import LeafProbe, check_plan, path_id
from scaling.parametrization import Parametrization, group_label

LAYER_AXIS = "layers"  # the logical axis the models scan over
SCALINGS = ("isotropic", "matched")
EPS_SCALINGS = ("constant", "fan_in")


def _scale(choice: str, sgd_lr_multiplier: float) -> float:
    """D or U: √(the SGD LR multiplier) when matched, 1 when isotropic."""
    return math.sqrt(sgd_lr_multiplier) if choice == "matched" else 1.0


def is_stacked(spec: ParamSpec) -> bool:
    return bool(spec.logical_axes) and spec.logical_axes[0] == LAYER_AXIS


def probe_plan(parametrization: Parametrization, cfg: MeZOConfig) -> dict:
    """A LeafProbe per parameter, as a tree like the parameters.

    `matched` probe (D) or update (U) scaling is √(the group's SGD LR multiplier), so the
    expected step is SGD under the parametrization's SGD column (μP-matched under μP); the
    fan_in ε scaling is (fan_in/base_fan_in)^(−1/2); vectors take no weight decay.
    """
    multipliers = parametrization.optimizer_multipliers_for(cfg)

    def scale(choice: str, spec: ParamSpec) -> float:
        return _scale(choice, multipliers[group_label(spec)].lr)

    plan = {}
    for path, spec in parametrization.specs.items():
        fan_in_mult = spec.fan_in / parametrization.base_specs[path].fan_in
        plan[path] = LeafProbe(
            leaf_id=path_id(path), stacked=is_stacked(spec),
            probe_scale=scale(cfg.probe_scaling, spec),
            update_scale=scale(cfg.update_scaling, spec),
            eps_scale=fan_in_mult**-0.5 if cfg.eps_scaling == "fan_in" else 1.0,
            weight_decay=0.0 if spec.role == "vector" else
            multipliers[group_label(spec)].weight_decay,
            sparse=spec.role != "vector")
    tree = tree_from_paths(plan)
    check_plan(tree)
    return tree


def step_multipliers(parametrization: Parametrization, cfg: MeZOConfig) -> dict[str, float]:
    """Group -> D·U, the LR multiplier of MeZO's expected (SGD) step in each group."""
    multipliers = parametrization.optimizer_multipliers_for(cfg)
    return {group: _scale(cfg.probe_scaling, mult.lr) * _scale(cfg.update_scaling, mult.lr)
            for group, mult in multipliers.items()}


def stacked_names(parametrization: Parametrization) -> dict[str, tuple]:
    """Name in the model's stacked (scanned) dict -> full path, for the per-layer transform."""
    names: dict[str, tuple] = {}
    for path, spec in parametrization.specs.items():
        if is_stacked(spec):
            if path[-1] in names:
                raise ValueError(f"stacked parameters {names[path[-1]]} and {path} share the "
                                 f"name {path[-1]!r}: expected one scanned collection")
            names[path[-1]] = path
    return names
