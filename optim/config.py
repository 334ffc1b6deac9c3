"""One config per optimizer family; each family's fields, defaults and allowed values are
declared here only, and each family knows which parameter roles it treats how.

A family is its config class: it says which column of a parametrization's rule table each role
reads (`rule_for`), which roles it steps as matrices or keeps on spheres, and builds its own
per-role optax transform (`role_transform`); `build_optimizer` composes them and nothing asks
which family was chosen. `configs/optim/<name>.yaml` must compose to exactly
`OPTIMIZERS[name]()` (a test checks it), so `optim=muon` on the command line and `MuonConfig()`
in Python train the same thing.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

from optim import role_transforms as parts
from optim.kernels.ns_math import NSNormalization
from optim.muon import UPDATE_SCALES, UpdateScale, auon_direction, scale_by_muon
from optim.objectives import Objective
from optim.orthogonalize import NSBackend, NSMethod, NSScheme, orthogonalize
from optim.schedules import Schedule
from optim.sphere import full_rank_norm

if TYPE_CHECKING:
    import optax

    from optim.build import RoleMultipliers
    from optim.stack import StackSharding

ClipScope = Literal["global", "role"]
Dtype = Literal["float32", "bfloat16"]
NSDtype = Literal["auto", "float32", "bfloat16"]  # auto: bfloat16 on GPU/TPU, float32 on CPU
NSSharding = Literal["stack", "compiler"]
# what MuonH divides the orthogonalized direction by: its ‖O‖_F, or the norm a full-rank
# orthogonal factor has, s·√min(fan_in, fan_out) (the same for a full-rank O)
SphereNorm = Literal["frobenius", "full_rank"]
ProbeScaling = Literal["isotropic", "matched"]  # matched: √(the group's SGD LR multiplier)
EpsScaling = Literal["constant", "fan_in"]
# One bad field: (its dotted name, its value, what was expected). The caller reports the first.
Problem = tuple[str, Any, str]


class RuleColumns(Protocol):
    """What a parametrization offers an optimizer: one column of its rule table per kind of
    step, each giving a role's scaling rule (scaling.schemes.Scheme is one)."""

    def adam(self, role: str) -> Any: ...
    def sgd(self, role: str) -> Any: ...
    def muon(self, role: str, update_scale: str) -> Any: ...
    def sphere(self, role: str) -> Any: ...


def _fraction(field: str, value: float, low_open: bool, high_open: bool) -> Iterator[Problem]:
    above = value > 0 if low_open else value >= 0
    below = value < 1 if high_open else value <= 1
    if not (above and below):
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        yield field, value, f"a value in {interval}"


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Fields every optimizer has: the base LR, its schedule, clipping and weight decay."""

    # roles whose matrices take a matrix direction (Muon's), and roles kept on their init
    # spheres (MuonH, AdamH); both need each matrix's fan axes
    matrix_roles: ClassVar[tuple[str, ...]] = ()
    sphere_roles: ClassVar[tuple[str, ...]] = ()
    # False for a zeroth-order optimizer: it steps from loss values, not gradients
    needs_gradient: ClassVar[bool] = True

    name: str
    lr: float
    weight_decay: float = 0.0  # LR-coupled: p -= lr * (u + weight_decay * p)
    wd_width_exponent: float | None = None  # hidden λ ∝ width_mult**γ; None: the table's rule
    schedule: Schedule = "cosine"
    # linear warmup: warmup_steps when set, else warmup_fraction of the run's steps (rounded
    # down), so a default warmup fits a run of any length
    warmup_steps: int | None = None
    warmup_fraction: float = 0.05
    decay_fraction: float = 0.2  # wsd: fraction of steps spent decaying
    final_lr_fraction: float = 0.1
    clip_norm: float = 1.0  # 0 disables gradient clipping
    # global: one norm over every gradient; role: each parameter group clipped by its own norm
    clip_scope: ClipScope = "global"
    # threshold × width_mult**κ; None: each group's gradient-norm growth from the rule table
    # (clip_scope=role only)
    clip_width_exponent: float | None = 0.0

    def rule_for(self, role: str, columns: RuleColumns) -> Any:
        """The rule-table column this optimizer reads for a role's LR, ε and weight decay."""
        raise NotImplementedError

    def role_transform(self, role: str, mult: RoleMultipliers, total_steps: int, *,
                       matrix_axes=None, stack: StackSharding | None = None
                       ) -> list[optax.GradientTransformation]:
        """The chain one parameter group of `role` takes, with its multipliers; `matrix_axes`
        (a MatrixAxes tree) for the roles it steps as matrices; `stack`: Muon's placement on a
        device mesh."""
        raise NotImplementedError

    def warmup_for(self, total_steps: int) -> int:
        """The steps of linear warmup in a run of `total_steps`."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return math.floor(self.warmup_fraction * total_steps)

    def scaled_lr(self, factor: float) -> OptimizerConfig:
        """This optimizer with every learning rate it holds multiplied by `factor` (what a
        transfer law does to a tuned proxy's LR)."""
        return dataclasses.replace(self, lr=self.lr * factor)

    def bare_direction(self) -> Callable[[Any], Any] | None:
        """Its matrix direction on a batch of matrices, without momentum or update scale (for
        diagnostics); None for a family without one."""
        return None

    def step_lr_multiplier(self, lr_multiplier: float) -> float:
        """The LR factor of a group's expected step, given its table multiplier."""
        return lr_multiplier

    def problems(self, steps: int) -> Iterator[Problem]:
        """Each bad value among the fields every optimizer has (the allowed values of choice
        fields are their Literal types, checked by the caller); `steps`: the run's length."""
        if type(self) is not OPTIMIZERS.get(self.name):
            yield ("optim.name", self.name, (f"the name of its config class "
                   f"{type(self).__name__}, one of {_class_names()}"))
        if not self.lr > 0:
            yield "optim.lr", self.lr, "a positive learning rate"
        if not self.weight_decay >= 0:
            yield "optim.weight_decay", self.weight_decay, "a non-negative number"
        if self.warmup_steps is not None and not 0 <= self.warmup_steps < steps:
            yield ("optim.warmup_steps", self.warmup_steps,
                   (f"a non-negative integer below train.steps={steps}, or null for "
                    f"optim.warmup_fraction={self.warmup_fraction} of the steps"))
        yield from _fraction("optim.warmup_fraction", self.warmup_fraction, False, True)
        yield from _fraction("optim.decay_fraction", self.decay_fraction, True, False)
        yield from _fraction("optim.final_lr_fraction", self.final_lr_fraction, False, False)
        if not self.clip_norm >= 0:
            yield "optim.clip_norm", self.clip_norm, "a non-negative number (0: off)"
        if self.clip_width_exponent is None:
            if self.clip_scope != "role":
                yield ("optim.clip_width_exponent", None, ("a number with "
                       "optim.clip_scope=global (null, each group's gradient-norm growth from "
                       "the rule table, needs optim.clip_scope=role)"))
        elif not math.isfinite(self.clip_width_exponent):
            yield ("optim.clip_width_exponent", self.clip_width_exponent,
                   "a finite exponent κ (threshold × width_mult**κ), or null")


@dataclasses.dataclass(frozen=True)
class AdamWConfig(OptimizerConfig):
    name: str = "adamw"
    lr: float = 1e-2
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8

    def rule_for(self, role, columns):
        return columns.adam(role)

    def role_transform(self, role, mult, total_steps, *, matrix_axes=None, stack=None):
        return [parts.adam_direction(self, mult), *parts.decay_and_step(self, mult, total_steps)]

    def problems(self, steps):
        yield from super().problems(steps)
        yield from _fraction("optim.b1", self.b1, False, True)
        yield from _fraction("optim.b2", self.b2, False, True)
        if not self.eps >= 0:
            yield "optim.eps", self.eps, "a non-negative number"


@dataclasses.dataclass(frozen=True)
class SGDConfig(OptimizerConfig):
    name: str = "sgd"
    lr: float = 0.3
    momentum: float = 0.9  # 0: plain SGD
    nesterov: bool = False

    def rule_for(self, role, columns):
        return columns.sgd(role)

    def role_transform(self, role, mult, total_steps, *, matrix_axes=None, stack=None):
        return [*parts.momentum_direction(self), *parts.decay_and_step(self, mult, total_steps)]

    def problems(self, steps):
        yield from super().problems(steps)
        yield from _fraction("optim.momentum", self.momentum, False, True)


@dataclasses.dataclass(frozen=True)
class WithAdamGroups(AdamWConfig):
    """A family that steps some roles its own way and the rest with AdamW, under the table's
    Adam column, at the base LR `adam_lr` when set, else at lr * adam_lr_ratio (fields each
    such family declares in its own place). An absolute `adam_lr` lets the two optimizers'
    optima be swept apart: with the ratio, sweeping lr moves both."""

    def scaled_lr(self, factor):
        adam_lr = None if self.adam_lr is None else self.adam_lr * factor
        return dataclasses.replace(self, lr=self.lr * factor, adam_lr=adam_lr)

    def adam_base_lr(self):
        """The Adam-trained groups' base LR (before the table's multipliers)."""
        return self.lr * self.adam_lr_ratio if self.adam_lr is None else self.adam_lr

    def role_transform(self, role, mult, total_steps, *, matrix_axes=None, stack=None):
        adam = dataclasses.replace(self, lr=self.adam_base_lr())
        return AdamWConfig.role_transform(adam, role, mult, total_steps)

    def problems(self, steps):
        yield from super().problems(steps)
        if not self.adam_lr_ratio > 0:
            yield "optim.adam_lr_ratio", self.adam_lr_ratio, "a positive number"
        if self.adam_lr is not None and not self.adam_lr > 0:
            yield ("optim.adam_lr", self.adam_lr,
                   "a positive learning rate, or null for lr * adam_lr_ratio")


@dataclasses.dataclass(frozen=True)
class MatrixOptimizerConfig(WithAdamGroups):
    """Hidden matrices take a matrix direction (`direction`); every other role AdamW."""

    matrix_roles: ClassVar[tuple[str, ...]] = ("hidden",)

    lr: float = 0.02
    momentum: float = 0.95
    nesterov: bool = True
    adam_lr_ratio: float = 0.5
    adam_lr: float | None = None  # the AdamW roles' base LR; None: lr * adam_lr_ratio
    update_scale: UpdateScale = "keller"
    momentum_dtype: Dtype = "float32"
    bias_correction: bool = False  # divide the momentum terms by (1 - β^t), as optax does
    ns_backend: NSBackend = "auto"  # auto: pallas only where verified compiled
    # on a device mesh: stack (whole matrices per device) | compiler (NS matmuls split as the
    # compiler propagates the parameters' sharding; the benchmark's baseline)
    ns_sharding: NSSharding = "stack"

    def direction(self, matrix_axes, stack: StackSharding | None = None
                  ) -> optax.GradientTransformation:
        """The direction transform of the matrices in `matrix_axes` (Muon's, AuON's)."""
        raise NotImplementedError

    def _momentum(self, stack: StackSharding | None) -> dict:
        """What every matrix direction shares: momentum, scale convention, placement."""
        return {"momentum": self.momentum, "nesterov": self.nesterov,
                "update_scale": self.update_scale, "momentum_dtype": self.momentum_dtype,
                "bias_correction": self.bias_correction, "ns_backend": self.ns_backend,
                "stack": stack if self.ns_sharding == "stack" else None}

    def rule_for(self, role, columns):
        if role in self.matrix_roles:
            return columns.muon(role, self.update_scale)
        return columns.adam(role)

    def role_transform(self, role, mult, total_steps, *, matrix_axes=None, stack=None):
        if role not in self.matrix_roles:
            return super().role_transform(role, mult, total_steps)
        parts.need_axes(self.name, matrix_axes)
        return [self.direction(matrix_axes, stack), *parts.decay_and_step(self, mult,
                                                                          total_steps)]

    def problems(self, steps):
        yield from super().problems(steps)
        yield from _fraction("optim.momentum", self.momentum, False, True)


@dataclasses.dataclass(frozen=True)
class MuonConfig(MatrixOptimizerConfig):
    name: str = "muon"
    ns_scheme: NSScheme = "polar_express"
    ns_steps: int | None = None  # None: the scheme's default (5, 5, 30)
    ns_normalization: NSNormalization = "schatten4"
    ns_method: NSMethod = "auto"  # auto: Gram for float32 at aspect >= 2
    ns_dtype: NSDtype = "auto"

    def bare_direction(self):
        return lambda u: orthogonalize(
            u, scheme=self.ns_scheme, steps=self.ns_steps, backend=self.ns_backend,
            compute_dtype=parts.ns_compute_dtype(self.ns_dtype),
            normalization=self.ns_normalization, method=self.ns_method)

    def direction(self, matrix_axes, stack=None):
        return scale_by_muon(
            matrix_axes, direction="newton_schulz", ns_scheme=self.ns_scheme,
            ns_steps=self.ns_steps, ns_normalization=self.ns_normalization,
            ns_method=self.ns_method, ns_dtype=parts.ns_compute_dtype(self.ns_dtype),
            **self._momentum(stack))

    def problems(self, steps):
        yield from super().problems(steps)
        if self.ns_steps is not None and not self.ns_steps >= 1:
            yield ("optim.ns_steps", self.ns_steps,
                   "a positive integer, or null for the scheme's default")
        if self.ns_backend == "pallas" and self.ns_method == "gram":
            yield ("optim.ns_method", self.ns_method, ("'auto' or 'direct' with "
                   "optim.ns_backend=pallas (its kernels run the direct form)"))


@dataclasses.dataclass(frozen=True)
class AuONConfig(MatrixOptimizerConfig):
    name: str = "auon"
    auon_hybrid: bool = False  # one Newton–Schulz step after the AuON normalization

    def bare_direction(self):
        return lambda u: auon_direction(u, hybrid=self.auon_hybrid, backend=self.ns_backend)

    def direction(self, matrix_axes, stack=None):
        return scale_by_muon(matrix_axes, direction="auon_hybrid" if self.auon_hybrid else "auon",
                             **self._momentum(stack))


class OnSphere:
    """MuonH and AdamH: hidden and output matrices take a relative step along a direction and
    stay on their init spheres (Adam's direction unless the family steps the role as a
    matrix); embeddings and vectors AdamW at adam_lr (or lr * adam_lr_ratio). weight_decay > 0
    is applied, with a warning."""

    sphere_roles: ClassVar[tuple[str, ...]] = ("hidden", "output")

    def rule_for(self, role, columns):
        return columns.sphere(role) if role in self.sphere_roles else columns.adam(role)

    def role_transform(self, role, mult, total_steps, *, matrix_axes=None, stack=None):
        if role not in self.sphere_roles:
            return WithAdamGroups.role_transform(self, role, mult, total_steps)
        parts.need_axes(self.name, matrix_axes)
        if role in self.matrix_roles:
            return parts.on_sphere(self, self.direction(matrix_axes, stack), mult, total_steps,
                                   matrix_axes, self.sphere_direction_norm())
        return parts.on_sphere(self, parts.adam_direction(self, mult), mult, total_steps,
                               matrix_axes)

    def sphere_direction_norm(self):
        """What a matrix direction is divided by on the sphere (None: its ‖O‖_F)."""
        return


@dataclasses.dataclass(frozen=True)
class MuonHConfig(OnSphere, MuonConfig):
    """MuonH (HyperP): hidden matrices along Muon's direction, the readout along Adam's."""

    name: str = "muonh"
    # the default run's optimum: val 1.408, 1.338, 1.339, 1.403 at 2^-6 … 2^-3 (docs/optimizers.md)
    lr: float = 0.04
    sphere_norm: SphereNorm = "frobenius"

    def sphere_direction_norm(self):
        if self.sphere_norm == "frobenius":
            return None
        return full_rank_norm(UPDATE_SCALES[self.update_scale])


@dataclasses.dataclass(frozen=True)
class AdamHConfig(OnSphere, WithAdamGroups):
    """AdamH: every hidden and output matrix along Adam's direction."""

    name: str = "adamh"
    lr: float = 0.02
    adam_lr_ratio: float = 0.5
    adam_lr: float | None = None


@dataclasses.dataclass(frozen=True)
class MeZOConfig(OptimizerConfig):
    """MeZO: SGD along a random probe z, its slope (L⁺ − L⁻)/2ε measured by two forward passes
    (optim/mezo.py). Expected step: SGD with per-group LR lr·D·U; the parametrization's SGD
    column gives D² or U² under `matched` and the weight-decay multipliers (vectors: none)."""

    needs_gradient: ClassVar[bool] = False

    name: str = "mezo"
    lr: float = 1.4e-3  # the fine-tuning optimum measured at the default shape (docs/finetuning.md)
    schedule: Schedule = "constant"  # the paper's; cosine and wsd work too
    warmup_steps: int = 0
    clip_norm: float = 0.0  # clips the projected gradient |g|; 0 disables
    eps: float = 1e-3  # perturbation scale ε
    n_probes: int = 1  # probes averaged per step (2 forward passes each)
    sparsity: float = 0.0  # Sparse MeZO: fraction of each matrix left untouched (0.8 in the paper)
    probe_scaling: ProbeScaling = "isotropic"  # the probe scale D
    update_scaling: ProbeScaling = "isotropic"  # the update scale U
    eps_scaling: EpsScaling = "constant"  # fan_in: ε·(fan_in/base_fan_in)^-1/2 per group
    param_dtype: Dtype = "float32"  # stored weights (bfloat16: stochastic rounding)
    objective: Objective = "cross_entropy"  # the loss MeZO minimizes
    curvature: bool = False  # one more forward per step: (L⁺ + L⁻ − 2L⁰)/ε², the Hessian trace
    curvature_decay: float = 0.9  # its moving average's decay
    safe_lr: float | None = None  # c: the LR is capped at c / (that moving average)

    def rule_for(self, role, columns):
        return columns.sgd(role)  # MeZO's expected step is SGD's

    def role_transform(self, role, mult, total_steps, *, matrix_axes=None, stack=None):
        raise ValueError(f"optim.name={self.name!r} is zeroth-order, not a gradient "
                         "transformation: train it with scaling's MeZO step, or compose "
                         "optim.zo_gradient with optax")

    def probe_factor(self, lr_multiplier: float) -> float:
        """D of a group with the table's SGD LR multiplier `lr_multiplier`."""
        return math.sqrt(lr_multiplier) if self.probe_scaling == "matched" else 1.0

    def update_factor(self, lr_multiplier: float) -> float:
        """U of a group, likewise."""
        return math.sqrt(lr_multiplier) if self.update_scaling == "matched" else 1.0

    def step_lr_multiplier(self, lr_multiplier):
        return self.probe_factor(lr_multiplier) * self.update_factor(lr_multiplier)

    def problems(self, steps):
        yield from super().problems(steps)
        if self.clip_scope != "global":  # its clip_norm bounds the projected gradient
            yield ("optim.clip_scope", self.clip_scope,
                   "global with optim=mezo (it clips the projected gradient, a scalar)")
        if self.clip_width_exponent != 0:
            yield ("optim.clip_width_exponent", self.clip_width_exponent,
                   "0 with optim=mezo (its clip is not width-aware)")
        if not self.eps > 0:
            yield "optim.eps", self.eps, "a positive perturbation scale"
        if not self.n_probes >= 1:
            yield "optim.n_probes", self.n_probes, "a positive integer"
        if not 0 <= self.sparsity < 1:
            yield ("optim.sparsity", self.sparsity,
                   "a fraction in [0, 1) of each matrix left unperturbed (0: dense MeZO)")
        yield from _fraction("optim.curvature_decay", self.curvature_decay, False, True)
        if self.safe_lr is not None:
            if not self.safe_lr > 0:
                yield "optim.safe_lr", self.safe_lr, "a positive constant c, or null"
            elif not self.curvature:
                yield ("optim.safe_lr", self.safe_lr,
                       ("null unless optim.curvature=true (the cap c/trace needs the trace "
                       "estimate)"))


OPTIMIZERS: dict[str, type[OptimizerConfig]] = {
    "adamw": AdamWConfig, "sgd": SGDConfig, "muon": MuonConfig, "auon": AuONConfig,
    "muonh": MuonHConfig, "adamh": AdamHConfig, "mezo": MeZOConfig}


def _class_names() -> dict[str, str]:
    return {n: c.__name__ for n, c in OPTIMIZERS.items()}


def optimizer_fields(name: str) -> list[str]:
    """The fields `optim=<name>` has, in declaration order."""
    return [f.name for f in dataclasses.fields(OPTIMIZERS[name])]


def expected_field(name: str) -> str:
    """What a field of `optim=<name>` must be, for the error on one it does not have."""
    return f"a field of optim={name} (it has {', '.join(optimizer_fields(name))})"


def optimizer_config(name: str, **fields) -> OptimizerConfig:
    """The config of optimizer `name` with `fields` changed from its defaults."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optim.name={name!r}: expected one of {list(OPTIMIZERS)}")
    unknown = sorted(set(fields) - set(optimizer_fields(name)))
    if unknown:
        raise ValueError(f"optim.{unknown[0]}={fields[unknown[0]]!r}: expected "
                         f"{expected_field(name)}")
    return OPTIMIZERS[name](**fields)
