"""Applies a rule table (scaling/rules.py) to a model, from base shapes computed abstractly."""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx

import models
import optim
from models.config import ModelConfig
from models.tagged import ParamSpec, iter_params, param_specs, tree_from_paths
from optim import MATRIX_ROLES, MatrixAxes, OptimizerConfig, RoleMultipliers
from scaling.config import ParamConfig
from scaling.rules import ATTENTION_EXPONENT, BASE_STD, MUON_LR, MUON_WD, ONE, TABLES, RoleRule, W


class Parametrization:
    """A rule table bound to one model's shapes and its base shapes."""

    def __init__(self, name: str, specs: dict[tuple, ParamSpec],
                 base_specs: dict[tuple, ParamSpec], head_dim: int, base_head_dim: int):
        if name not in TABLES:
            raise ValueError(f"param.name={name!r}: expected one of {sorted(TABLES)}")
        if set(specs) != set(base_specs):
            raise ValueError("the base model has different parameters from the model")
        self.name, self.table = name, TABLES[name]
        self.specs, self.base_specs = specs, base_specs
        self.head_dim, self.base_head_dim = head_dim, base_head_dim

    def fan_mults(self, path: tuple) -> tuple[float, float]:
        spec, base = self.specs[path], self.base_specs[path]
        return spec.fan_in / base.fan_in, spec.fan_out / base.fan_out

    def rule(self, path: tuple) -> RoleRule:
        return self.table[self.specs[path].role]

    def init_std(self, path: tuple) -> float:
        spec, base = self.specs[path], self.base_specs[path]
        base_std = BASE_STD[spec.role](spec.init_scale, base.fan_in)
        return base_std * self.rule(path).init_std(*self.fan_mults(path))

    def _per_role(self, value_of) -> dict[str, Any]:
        """One value per role; width dimensions grow together, so a role shares its factors."""
        out: dict[str, Any] = {}
        for path, spec in self.specs.items():
            value = value_of(path)
            if out.setdefault(spec.role, value) != value:
                raise ValueError(
                    f"parameters of role {spec.role!r} scale differently ({out[spec.role]} vs "
                    f"{value} at {'/'.join(map(str, path))}): every width dimension must grow "
                    "by the same factor")
        return out

    @property
    def logit_multiplier(self) -> float:
        return self._per_role(lambda p: self.rule(p).forward(*self.fan_mults(p)))["output"]

    @property
    def attention_scale(self) -> float:
        head_dim_mult = self.head_dim / self.base_head_dim
        return self.base_head_dim**-0.5 * head_dim_mult ** ATTENTION_EXPONENT[self.name]

    def optimizer_multipliers(self, family: str, *, update_scale: str | None = None,
                              wd_width_exponent: float | None = None
                              ) -> dict[str, RoleMultipliers]:
        """Role -> multipliers for `family` 'adam' (Adam-like), 'sgd' or 'muon'.

        'muon' reads MUON_LR[update_scale] for hidden matrices and the Adam column for the other
        roles. `wd_width_exponent` γ replaces the hidden weight-decay rule by λ ∝ m^γ.
        """
        if family not in ("adam", "sgd", "muon"):
            raise ValueError(f"optimizer family {family!r}: expected 'adam', 'sgd' or 'muon'")
        if family == "muon" and update_scale not in MUON_LR[self.name]:
            raise ValueError(f"optim.update_scale={update_scale!r}: expected one of "
                             f"{sorted(MUON_LR[self.name])}")

        def of(path):
            rule, mults = self.rule(path), self.fan_mults(path)
            hidden = self.specs[path].role == "hidden"
            if family == "sgd":
                lr, eps, wd = rule.sgd_lr, ONE, rule.sgd_wd
            elif family == "muon" and hidden:
                lr, eps, wd = MUON_LR[self.name][update_scale], ONE, MUON_WD[self.name]
            else:
                lr, eps, wd = rule.adam_lr, rule.adam_eps, rule.adam_wd
            if hidden and wd_width_exponent is not None:
                wd = W(a=wd_width_exponent)
            return RoleMultipliers(lr(*mults), eps(*mults), wd(*mults))
        return self._per_role(of)

    def optimizer_multipliers_for(self, cfg: OptimizerConfig) -> dict[str, RoleMultipliers]:
        """The per-role multipliers the optimizer `cfg` trains with under this table."""
        return self.optimizer_multipliers(
            cfg.family, update_scale=getattr(cfg, "update_scale", None),
            wd_width_exponent=cfg.wd_width_exponent)

    def matrix_axes(self) -> dict:
        """Fan axes of every matrix a matrix optimizer owns, as a tree like the parameters."""
        return tree_from_paths({path: MatrixAxes(spec.fan_in_axes, spec.fan_out_axes)
                                for path, spec in self.specs.items()
                                if spec.role in MATRIX_ROLES})


def _abstract_specs(cfg: ModelConfig, vocab_size: int) -> dict[tuple, ParamSpec]:
    return param_specs(nnx.eval_shape(lambda: models.create(cfg, vocab_size)))


def make_parametrization(model_cfg: ModelConfig, param_cfg: ParamConfig,
                         vocab_size: int) -> Parametrization:
    base_cfg = dataclasses.replace(model_cfg, width=param_cfg.base_width,
                                   depth=param_cfg.base_depth)
    return Parametrization(param_cfg.name, _abstract_specs(model_cfg, vocab_size),
                           _abstract_specs(base_cfg, vocab_size), model_cfg.head_dim,
                           base_cfg.head_dim)


def build_model(model_cfg: ModelConfig, param_cfg: ParamConfig, vocab_size: int,
                seed: int) -> tuple[nnx.Module, Parametrization]:
    """The model with init scales and forward multipliers set by the parametrization."""
    parametrization = make_parametrization(model_cfg, param_cfg, vocab_size)
    model = models.create(model_cfg, vocab_size,
                          logit_multiplier=parametrization.logit_multiplier,
                          attention_scale=parametrization.attention_scale, seed=seed)
    for path, param in iter_params(model):
        if parametrization.specs[path].init == "normal":
            param[...] = param[...] * parametrization.init_std(path)
    return model, parametrization


def build_optimizer(cfg: OptimizerConfig, parametrization: Parametrization, labels, *,
                    total_steps: int):
    """`optim.build_optimizer` with the multipliers and matrix axes this parametrization gives."""
    return optim.build_optimizer(cfg, labels, parametrization.optimizer_multipliers_for(cfg),
                                 total_steps=total_steps,
                                 matrix_axes=parametrization.matrix_axes())
