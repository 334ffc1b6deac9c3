"""Applies a rule table (scaling/rules.py) to a model, from base shapes computed abstractly."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from flax import nnx

import models
import optim
from models.config import ModelConfig
from models.tagged import ParamSpec, iter_params, param_specs, tree_from_paths
from optim import MATRIX_ROLES, SPHERE_ROLES, MatrixAxes, OptimizerConfig, RoleMultipliers
from scaling.config import ParamConfig
from scaling.rules import (
    ATTENTION_EXPONENT,
    ATTENTION_MULTIPLIER,
    BASE_STD,
    DEPTH_RULES,
    FORWARD_MULTIPLIERS,
    INIT_MULTIPLIERS,
    LR_MULTIPLIERS,
    MUON_DEPTH_LR,
    MUON_LR,
    MUON_WD,
    ONE,
    SPHERE_LR,
    TABLES,
    TUNABLE,
    Depth,
    RoleRule,
    W,
)

FAMILIES = ("adam", "sgd", "muon", "sphere", "zeroth_order")


def group_label(spec: ParamSpec) -> str:
    """The optimizer group of a parameter: its role, qualified when it sits in a residual block
    (depth rules scale block parameters apart from the same role outside blocks)."""
    return f"{spec.role}.block" if spec.residual else spec.role


class Parametrization:
    """A rule table bound to one model's shapes and depth, and its base shapes and depth, with
    the tuned per-role multipliers (`tuned`: a TUNABLE field -> value, missing ones 1)."""

    def __init__(self, name: str, specs: dict[tuple, ParamSpec],
                 base_specs: dict[tuple, ParamSpec], head_dim: int, base_head_dim: int,
                 depth: int = 1, base_depth: int = 1, tuned: Mapping[str, float] | None = None):
        if name not in TABLES:
            raise ValueError(f"param.name={name!r}: expected one of {sorted(TABLES)}")
        unknown = set(tuned or {}) - set(TUNABLE)
        if unknown:
            raise ValueError(f"tuned multipliers {sorted(unknown)}: expected some of {TUNABLE}")
        self.tuned = dict(tuned or {})
        if set(specs) != set(base_specs):
            raise ValueError("the base model has different parameters from the model")
        self.name, self.table, self.depth_rule = name, TABLES[name], DEPTH_RULES[name]
        self.specs, self.base_specs = specs, base_specs
        self.head_dim, self.base_head_dim = head_dim, base_head_dim
        self.depth, self.base_depth = depth, base_depth

    def depth_factor(self, path: tuple, rule: Depth) -> float:
        """`rule` at this depth for a parameter in a residual block; 1 outside blocks."""
        return rule(self.depth, self.base_depth) if self.specs[path].residual else 1.0

    @property
    def branch_multiplier(self) -> float:
        return self.depth_rule.branch(self.depth, self.base_depth)

    def labels(self) -> dict:
        """Every parameter's optimizer group (group_label), as a tree like the parameters."""
        return tree_from_paths({path: group_label(spec) for path, spec in self.specs.items()})

    def fan_mults(self, path: tuple) -> tuple[float, float]:
        spec, base = self.specs[path], self.base_specs[path]
        return spec.fan_in / base.fan_in, spec.fan_out / base.fan_out

    def rule(self, path: tuple) -> RoleRule:
        return self.table[self.specs[path].role]

    def tuned_value(self, fields: Mapping[str, str] | str, role: str | None = None) -> float:
        """The tuned multiplier `fields[role]` (or the field `fields`), 1 where none applies."""
        field = fields if isinstance(fields, str) else fields.get(role)
        return 1.0 if field is None else self.tuned.get(field, 1.0)

    def init_std(self, path: tuple) -> float:
        spec, base = self.specs[path], self.base_specs[path]
        base_std = BASE_STD[spec.role](spec.init_scale, base.fan_in)
        return (base_std * self.rule(path).init_std(*self.fan_mults(path))
                * self.tuned_value(INIT_MULTIPLIERS, spec.role))

    def _per_group(self, value_of, label=group_label) -> dict[str, Any]:
        """One value per group; width dimensions grow together, so a group shares its factors."""
        out: dict[str, Any] = {}
        for path, spec in self.specs.items():
            value, key = value_of(path), label(spec)
            if out.setdefault(key, value) != value:
                raise ValueError(
                    f"parameters of group {key!r} scale differently ({out[key]} vs "
                    f"{value} at {'/'.join(map(str, path))}): every width dimension must grow "
                    "by the same factor")
        return out

    @property
    def logit_multiplier(self) -> float:
        return self._per_group(
            lambda p: (self.rule(p).forward(*self.fan_mults(p))
                       * self.tuned_value(FORWARD_MULTIPLIERS, self.specs[p].role)),
            lambda spec: spec.role)["output"]

    @property
    def attention_scale(self) -> float:
        head_dim_mult = self.head_dim / self.base_head_dim
        return (self.base_head_dim**-0.5 * head_dim_mult ** ATTENTION_EXPONENT[self.name]
                * self.tuned_value(ATTENTION_MULTIPLIER))

    def optimizer_multipliers(self, family: str, *, update_scale: str | None = None,
                              wd_width_exponent: float | None = None
                              ) -> dict[str, RoleMultipliers]:
        """Group label -> multipliers for `family` 'adam' (Adam-like), 'sgd', 'muon' or 'sphere'.

        'muon' reads MUON_LR[update_scale] for hidden matrices and 'sphere' SPHERE_LR for hidden
        and output matrices; both the Adam column for the other roles. Block parameters take the
        depth rule on top. `wd_width_exponent` γ replaces the hidden weight-decay rule by λ ∝ m^γ.
        A tuned per-role LR multiplier (LR_MULTIPLIERS) multiplies its role's LR in every family.
        """
        if family not in FAMILIES:
            raise ValueError(f"optimizer family {family!r}: expected one of {list(FAMILIES)}")
        if family == "muon" and update_scale not in MUON_LR[self.name]:
            raise ValueError(f"optim.update_scale={update_scale!r}: expected one of "
                             f"{sorted(MUON_LR[self.name])}")
        depth = self.depth_rule

        def of(path):
            rule, mults, role = self.rule(path), self.fan_mults(path), self.specs[path].role
            if family in ("sgd", "zeroth_order"):  # MeZO's expected step is SGD's
                lr, eps, wd = rule.sgd_lr, ONE, rule.sgd_wd
                lr_depth, eps_depth = depth.sgd_lr, Depth()
            elif family == "muon" and role in MATRIX_ROLES:
                lr, eps, wd = MUON_LR[self.name][update_scale], ONE, MUON_WD[self.name]
                lr_depth, eps_depth = MUON_DEPTH_LR[self.name][update_scale], Depth()
            elif family == "sphere" and role in SPHERE_ROLES:
                lr, eps, wd = SPHERE_LR[role], rule.adam_eps, ONE
                lr_depth, eps_depth = depth.sphere_lr, depth.adam_eps
            else:
                lr, eps, wd = rule.adam_lr, rule.adam_eps, rule.adam_wd
                lr_depth, eps_depth = depth.adam_lr, depth.adam_eps
            if role == "hidden" and wd_width_exponent is not None:
                wd = W(a=wd_width_exponent)
            return RoleMultipliers(lr(*mults) * self.depth_factor(path, lr_depth)
                                   * self.tuned_value(LR_MULTIPLIERS, role),
                                   eps(*mults) * self.depth_factor(path, eps_depth), wd(*mults))
        return self._per_group(of)

    def optimizer_multipliers_for(self, cfg: OptimizerConfig) -> dict[str, RoleMultipliers]:
        """The per-role multipliers the optimizer `cfg` trains with under this table."""
        return self.optimizer_multipliers(
            cfg.family, update_scale=getattr(cfg, "update_scale", None),
            wd_width_exponent=cfg.wd_width_exponent)

    def matrix_axes(self) -> dict:
        """Fan axes of every matrix a matrix or sphere optimizer owns, as a parameter-like tree."""
        return tree_from_paths({path: MatrixAxes(spec.fan_in_axes, spec.fan_out_axes)
                                for path, spec in self.specs.items()
                                if spec.role in MATRIX_ROLES + SPHERE_ROLES})

    @property
    def width_mult(self) -> float:
        """m = width / base_width, read off the readout's fan-in (every width grows together)."""
        return self._per_group(lambda p: self.fan_mults(p)[0], lambda spec: spec.role)["output"]

    def gradient_growth(self) -> dict[str, float]:
        """Group label -> the growth of its gradient's norm with width, from the table's init and
        forward columns (width only, at a fixed depth).

        With Θ(1) activations, a matrix's gradient is its forward multiplier × its inputs (norm
        √fan_in) ⊗ the backward signal at its outputs (norm √fan_out × its coordinates); that
        signal is the logits' Θ(1) gradient at the readout and, below it, that gradient times the
        readout's effective weight (forward × init std). SP: hidden and output √m, input and
        vectors 1; μP: hidden 1, the others 1/√m.
        """
        backward = self._per_group(lambda p: (self.rule(p).forward(*self.fan_mults(p))
                                              * self.rule(p).init_std(*self.fan_mults(p))),
                                   lambda spec: spec.role)["output"]

        def of(path):
            fan_in_mult, fan_out_mult = self.fan_mults(path)
            own = self.rule(path).forward(fan_in_mult, fan_out_mult) * (
                fan_in_mult * fan_out_mult) ** 0.5
            return own if self.specs[path].role == "output" else own * backward
        return self._per_group(of)

    def clip_factors(self, cfg: OptimizerConfig) -> dict[str, float]:
        """Group label -> its factor on optim.clip_norm: width_mult**optim.clip_width_exponent,
        or with the exponent null the group's gradient_growth, so a clip that binds at the base
        width binds alike at every width."""
        if cfg.clip_width_exponent is None:
            return self.gradient_growth()
        return self._per_group(lambda p: self.width_mult ** cfg.clip_width_exponent)

    def check_spheres(self, cfg: OptimizerConfig) -> None:
        """A sphere optimizer needs every matrix it owns to start with a nonzero norm."""
        if cfg.family != "sphere":
            return
        for path, spec in self.specs.items():
            if spec.role in SPHERE_ROLES and spec.init == "zeros":
                field = "model.readout_init" if spec.role == "output" else "/".join(map(str, path))
                raise ValueError(f"{field}=zero: expected a normal init with optim={cfg.name} "
                                 "(a zero matrix has no sphere to stay on)")


def _abstract_specs(cfg: ModelConfig, vocab_size: int) -> dict[tuple, ParamSpec]:
    return param_specs(nnx.eval_shape(lambda: models.create(cfg, vocab_size)))


def make_parametrization(model_cfg: ModelConfig, param_cfg: ParamConfig,
                         vocab_size: int) -> Parametrization:
    base_cfg = dataclasses.replace(model_cfg, width=param_cfg.base_width,
                                   depth=param_cfg.base_depth)
    return Parametrization(param_cfg.name, _abstract_specs(model_cfg, vocab_size),
                           _abstract_specs(base_cfg, vocab_size), model_cfg.head_dim,
                           base_cfg.head_dim, model_cfg.depth, param_cfg.base_depth,
                           {field: getattr(param_cfg, field) for field in TUNABLE})


def build_model(model_cfg: ModelConfig, param_cfg: ParamConfig, vocab_size: int,
                seed: int) -> tuple[nnx.Module, Parametrization]:
    """The model with init scales and forward multipliers set by the parametrization."""
    parametrization = make_parametrization(model_cfg, param_cfg, vocab_size)
    model = models.create(model_cfg, vocab_size,
                          logit_multiplier=parametrization.logit_multiplier,
                          attention_scale=parametrization.attention_scale,
                          branch_multiplier=parametrization.branch_multiplier, seed=seed)
    for path, param in iter_params(model):
        if parametrization.specs[path].init == "normal":
            param[...] = param[...] * parametrization.init_std(path)
    return model, parametrization


def build_optimizer(cfg: OptimizerConfig, parametrization: Parametrization, *, total_steps: int,
                    stack=None):
    """`optim.build_optimizer` with the groups, multipliers, matrix axes and clipping factors
    this parametrization gives; `stack`: Muon's placement on a device mesh (scaling.sharding)."""
    parametrization.check_spheres(cfg)
    return optim.build_optimizer(cfg, parametrization.labels(),
                                 parametrization.optimizer_multipliers_for(cfg),
                                 total_steps=total_steps,
                                 matrix_axes=parametrization.matrix_axes(),
                                 clip_factors=parametrization.clip_factors(cfg), stack=stack)
