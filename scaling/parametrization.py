"""Applies a rule table (scaling/rules.py) to a model, from base shapes computed abstractly."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

import models
import optim
from models.config import ModelConfig, Runtime
from models.tagged import ParamSpec, iter_params, param_specs, tree_from_paths
from optim import MatrixAxes, OptimizerConfig, RoleMultipliers
from scaling.config import ParamConfig
from scaling.inference import infer_specs, is_fully_tagged
from scaling.rules import (
    ATTENTION_MULTIPLIER,
    BASE_STD,
    FORWARD_MULTIPLIERS,
    INIT_MULTIPLIERS,
    LR_MULTIPLIERS,
    TUNABLE,
    Depth,
    RoleRule,
    W,
)
from scaling.schemes import Scheme


def group_label(spec: ParamSpec) -> str:
    """The optimizer group of a parameter: its role, qualified when it sits in a residual block
    (depth rules scale block parameters apart from the same role outside blocks) and when no
    axis of it grows with width (no fan axes, e.g. QK-norm's gains over the head dim: μP's
    finite dimensions, whose rules see a multiplier of 1)."""
    label = f"{spec.role}.block" if spec.residual else spec.role
    return label if spec.fan_in_axes or spec.fan_out_axes else f"{label}.finite"


class Parametrization:
    """A scheme bound to one model's shapes and depth, and its base shapes and depth, with the
    tuned per-role multipliers (`tuned`: a TUNABLE field -> value, missing ones 1)."""

    def __init__(self, scheme: Scheme, specs: dict[tuple, ParamSpec],
                 base_specs: dict[tuple, ParamSpec], head_dim: int, base_head_dim: int,
                 depth: int = 1, base_depth: int = 1, tuned: Mapping[str, float] | None = None):
        unknown = set(tuned or {}) - set(TUNABLE)
        if unknown:
            raise ValueError(f"tuned multipliers {sorted(unknown)}: expected some of {TUNABLE}")
        self.tuned = dict(tuned or {})
        if set(specs) != set(base_specs):
            raise ValueError("the base model has different parameters from the model")
        self.scheme, self.table, self.depth_rule = scheme, scheme.width, scheme.depth
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
    def readout(self) -> tuple[tuple[float, float], float]:
        """The readout's (fan-in, fan-out) growth and its init std's growth: the output
        matrix's, or with tied embeddings the embedding's read transposed (its fan-out, the
        width, is the readout's fan-in) under the input role's init; growth 1 for a model
        with neither."""
        roles = {spec.role for spec in self.specs.values()}
        role = "output" if "output" in roles else "input"
        if role not in roles:  # no readout and no embedding (a block alone): nothing to scale
            return (1.0, 1.0), 1.0
        (mults,) = {self.fan_mults(path) for path, spec in self.specs.items()
                    if spec.role == role}
        std = self.table[role].init_std(*mults)
        return (mults if role == "output" else mults[::-1]), std

    @property
    def logit_multiplier(self) -> float:
        """The output role's forward multiplier, on a readout matrix or a tied embedding."""
        return (self.table["output"].forward(*self.readout[0])
                * self.tuned_value(FORWARD_MULTIPLIERS, "output"))

    @property
    def attention_scale(self) -> float:
        head_dim_mult = self.head_dim / self.base_head_dim
        return (self.base_head_dim**-0.5 * head_dim_mult**self.scheme.attention_exponent
                * self.tuned_value(ATTENTION_MULTIPLIER))

    @property
    def readout_modules(self) -> tuple[tuple, ...]:
        """Paths of the modules on the readout's path (holding an output-role parameter, below
        the model itself): their raw outputs grow with width by design under μP."""
        outputs = [path for path, spec in self.specs.items() if spec.role == "output"]
        return tuple(sorted({path[:i] for path in outputs for i in range(1, len(path))},
                            key=str))

    def runtime(self, activation_sharding: jax.sharding.Sharding | None = None) -> Runtime:
        """What the model is built with: this parametrization's forward multipliers, and
        where its activations live on a device mesh (None: no mesh)."""
        return Runtime(logit_multiplier=self.logit_multiplier,
                       attention_scale=self.attention_scale,
                       branch_multiplier=self.branch_multiplier,
                       activation_sharding=activation_sharding,
                       readout_modules=self.readout_modules)

    def optimizer_multipliers(self, cfg: OptimizerConfig) -> dict[str, RoleMultipliers]:
        """Group label -> the multipliers the optimizer `cfg` trains with: the table column it
        reads for each role (`cfg.rule_for`), with the depth rule on top inside residual blocks.
        `optim.wd_width_exponent` γ replaces the hidden weight-decay rule by λ ∝ m^γ; a tuned
        per-role LR multiplier (LR_MULTIPLIERS) multiplies its role's LR in every family."""

        def of(path):
            role, mults = self.specs[path].role, self.fan_mults(path)
            rule = cfg.rule_for(role, self.scheme)
            wd = rule.weight_decay
            if role == "hidden" and cfg.wd_width_exponent is not None:
                wd = W(a=cfg.wd_width_exponent)
            return RoleMultipliers(rule.lr(*mults) * self.depth_factor(path, rule.lr_depth)
                                   * self.tuned_value(LR_MULTIPLIERS, role),
                                   rule.eps(*mults) * self.depth_factor(path, rule.eps_depth),
                                   wd(*mults))
        return self._per_group(of)

    def matrix_axes(self, cfg: OptimizerConfig) -> dict:
        """Fan axes of every matrix `cfg` steps as a matrix or keeps on a sphere, as a
        parameter-like tree."""
        owned = cfg.matrix_roles + cfg.sphere_roles
        return tree_from_paths({path: MatrixAxes(spec.fan_in_axes, spec.fan_out_axes)
                                for path, spec in self.specs.items() if spec.role in owned})

    @property
    def width_mult(self) -> float:
        """m = width / base_width, read off the readout's fan-in (every width grows together)."""
        return self.readout[0][0]

    def gradient_growth(self) -> dict[str, float]:
        """Group label -> the growth of its gradient's norm with width, from the table's init and
        forward columns (width only, at a fixed depth).

        With Θ(1) activations, a matrix's gradient is its forward multiplier × its inputs (norm
        √fan_in) ⊗ the backward signal at its outputs (norm √fan_out × its coordinates); that
        signal is the logits' Θ(1) gradient at the readout and, below it, that gradient times the
        readout's effective weight (forward × init std). SP: hidden and output √m, input and
        vectors 1; μP: hidden 1, the others 1/√m.
        """
        readout_mults, readout_std = self.readout
        backward = self.table["output"].forward(*readout_mults) * readout_std

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
        """A sphere optimizer needs every matrix it keeps on a sphere to start nonzero."""
        for path, spec in self.specs.items():
            if spec.role in cfg.sphere_roles and spec.init == "zero":
                field = "model.readout_init" if spec.role == "output" else "/".join(map(str, path))
                raise ValueError(f"{field}=zero: expected a normal init with optim={cfg.name} "
                                 "(a zero matrix has no sphere to stay on)")


def _abstract(cfg: ModelConfig, vocab_size: int) -> nnx.Module:
    return nnx.eval_shape(lambda: models.create(cfg, vocab_size))


def _readout_init(specs: dict[tuple, ParamSpec], readout_init: str) -> dict[tuple, ParamSpec]:
    """Inferred readouts initialized as model.readout_init says (a tagged model sets its own)."""
    return {path: dataclasses.replace(spec, init=readout_init)
            if spec.role == "output" and spec.redraw else spec for path, spec in specs.items()}


def make_parametrization(model_cfg: ModelConfig, param_cfg: ParamConfig,
                         vocab_size: int) -> Parametrization:
    """The base shape is the model at param.base_width and the model's own depth: widths set
    every fan ratio, and depth rules read the depths as numbers (a model whose blocks are a list
    has other parameters at another depth). A model.factory model's specs are inferred from the
    base and a delta copy at twice the base width."""
    base_cfg = dataclasses.replace(model_cfg, width=param_cfg.base_width)
    model, base = _abstract(model_cfg, vocab_size), _abstract(base_cfg, vocab_size)
    if is_fully_tagged(model):
        specs, base_specs = param_specs(model), param_specs(base)
    else:
        delta = _abstract(dataclasses.replace(base_cfg, width=2 * param_cfg.base_width),
                          vocab_size)
        specs, base_specs = (_readout_init(infer_specs(m, base, delta), model_cfg.readout_init)
                             for m in (model, base))
    return Parametrization(param_cfg.scheme, specs, base_specs, model_cfg.head_dim,
                           base_cfg.head_dim, model_cfg.depth, param_cfg.base_depth,
                           {field: getattr(param_cfg, field) for field in TUNABLE})


@functools.cache
def _initializer(model_cfg: ModelConfig, vocab_size: int, specs: tuple[ParamSpec, ...]):
    """(seed, stds) -> the parameters (a pure dict), drawn as `draw_params` says with
    stds["<path>"]. One function per model shape: jit compiles it once for every seed and every
    parametrization of that shape (the stds are arguments, not constants)."""
    by_path = {spec.path: spec for spec in specs}

    def init(seed, stds: dict):
        model = models.create(model_cfg, vocab_size, Runtime(), jax.random.key(seed))
        draw_params(model, by_path, lambda path: stds["/".join(map(str, path))],
                    jax.random.key(seed))
        return nnx.split(model)[1].to_pure_dict()

    return init


def draw_params(model: nnx.Module, specs: dict[tuple, ParamSpec], std_of, key: jax.Array
                ) -> None:
    """Every parameter of `model` set in place as its spec says: an inferred one (`redraw`: the
    layer drew it its own way) drawn afresh, a tagged one's unit draw kept; a normal one then
    × std_of(path)."""
    for i, (path, param) in enumerate(iter_params(model)):
        spec = specs[path]
        value = (fresh_draw(spec.init, spec.shape, jax.random.fold_in(key, i)) if spec.redraw
                 else param[...])
        if spec.init == "normal":
            value = value * std_of(path)
        param[...] = value.astype(param[...].dtype)


def fresh_draw(init: str, shape: tuple[int, ...], key: jax.Array) -> jax.Array:
    """A unit draw of an inferred parameter: its spec's init, the std applied after."""
    if init == "zero":
        return jnp.zeros(shape, jnp.float32)
    if init == "one":
        return jnp.ones(shape, jnp.float32)
    return jax.random.normal(key, shape, jnp.float32)


def init_params(model_cfg: ModelConfig, parametrization: Parametrization, vocab_size: int,
                seed: int, *, shardings=None) -> dict:
    """The parameters at `seed`, initialized inside one compiled program (every path that
    starts a model gets the same numbers); with `shardings` (a tree like the parameters) each
    is created where a device mesh keeps it, so no host ever holds the whole model."""
    stds = {"/".join(map(str, path)): parametrization.init_std(path)
            for path, spec in parametrization.specs.items() if spec.init == "normal"}
    init = _initializer(model_cfg, vocab_size, tuple(parametrization.specs.values()))
    return jax.jit(init, out_shardings=shardings)(seed, stds)


def build_model(model_cfg: ModelConfig, param_cfg: ParamConfig, vocab_size: int, seed: int, *,
                activation_sharding: jax.sharding.Sharding | None = None
                ) -> tuple[nnx.Module, Parametrization]:
    """The model with init scales and forward multipliers set by the parametrization;
    `activation_sharding`: where its residual stream lives on a device mesh."""
    parametrization = make_parametrization(model_cfg, param_cfg, vocab_size)
    graphdef, state = nnx.split(abstract_model(model_cfg, parametrization, vocab_size,
                                               activation_sharding))
    state.replace_by_pure_dict(init_params(model_cfg, parametrization, vocab_size, seed))
    return nnx.merge(graphdef, state), parametrization


def abstract_model(model_cfg: ModelConfig, parametrization: Parametrization, vocab_size: int,
                   activation_sharding: jax.sharding.Sharding | None = None) -> nnx.Module:
    """The model as shapes only, with its runtime settings: its graph and its specs."""
    runtime = parametrization.runtime(activation_sharding)
    return nnx.eval_shape(lambda: models.create(model_cfg, vocab_size, runtime))


def build_optimizer(cfg: OptimizerConfig, parametrization: Parametrization, *, total_steps: int,
                    stack=None):
    """`optim.build_optimizer` with the groups, multipliers, matrix axes and clipping factors
    this parametrization gives; `stack`: Muon's placement on a device mesh (scaling.sharding)."""
    parametrization.check_spheres(cfg)
    return optim.build_optimizer(cfg, parametrization.labels(),
                                 parametrization.optimizer_multipliers(cfg),
                                 total_steps=total_steps,
                                 matrix_axes=parametrization.matrix_axes(cfg),
                                 clip_factors=parametrization.clip_factors(cfg), stack=stack)
