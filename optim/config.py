"""One config per optimizer family; each family's fields and defaults are defined here only.

`configs/optim/<name>.yaml` must compose to exactly `OPTIMIZERS[name]()` (a test checks it), so
`optim=muon` on the command line and `MuonConfig()` in Python train the same thing.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Fields every optimizer has: the base LR, its schedule, clipping and weight decay."""

    # Which column of the parametrization's rule table the optimizer reads: adam | sgd | muon |
    # sphere (MuonH, AdamH: relative steps on the matrices, Adam's column on the rest) |
    # zeroth_order (MeZO: SGD's column for its probe and update scales).
    family: ClassVar[str]

    name: str
    lr: float
    weight_decay: float = 0.0  # LR-coupled: p -= lr * (u + weight_decay * p)
    wd_width_exponent: float | None = None  # hidden λ ∝ width_mult**γ; None: the table's rule
    schedule: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 20
    decay_fraction: float = 0.2  # wsd: fraction of steps spent decaying
    final_lr_fraction: float = 0.1
    clip_norm: float = 1.0  # 0 disables gradient clipping
    # global: one norm over every gradient; role: each parameter group clipped by its own norm
    clip_scope: str = "global"
    # threshold × width_mult**κ; None: each group's gradient-norm growth from the rule table
    # (clip_scope=role only)
    clip_width_exponent: float | None = 0.0


@dataclasses.dataclass(frozen=True)
class AdamWConfig(OptimizerConfig):
    family: ClassVar[str] = "adam"

    name: str = "adamw"
    lr: float = 1e-2
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8


@dataclasses.dataclass(frozen=True)
class SGDConfig(OptimizerConfig):
    family: ClassVar[str] = "sgd"

    name: str = "sgd"
    lr: float = 0.3
    momentum: float = 0.9  # 0: plain SGD
    nesterov: bool = False


@dataclasses.dataclass(frozen=True)
class MatrixOptimizerConfig(AdamWConfig):
    """Hidden matrices take a matrix direction; every other role AdamW at lr * adam_lr_ratio."""

    family: ClassVar[str] = "muon"

    lr: float = 0.02
    momentum: float = 0.95
    nesterov: bool = True
    adam_lr_ratio: float = 0.5
    update_scale: str = "keller"  # keller | spectral | moonlight
    momentum_dtype: str = "float32"  # float32 | bfloat16
    bias_correction: bool = False  # divide the momentum terms by (1 - β^t), as optax does
    ns_backend: str = "auto"  # auto | xla | pallas (auto: pallas only where verified compiled)
    # on a device mesh: stack (whole matrices per device) | compiler (NS matmuls split as the
    # compiler propagates the parameters' sharding; the benchmark's baseline)
    ns_sharding: str = "stack"


@dataclasses.dataclass(frozen=True)
class MuonConfig(MatrixOptimizerConfig):
    name: str = "muon"
    ns_scheme: str = "polar_express"  # jordan | polar_express | classical
    ns_steps: int | None = None  # None: the scheme's default (5, 5, 30)
    ns_normalization: str = "schatten4"  # frobenius | schatten4
    ns_method: str = "auto"  # auto | direct | gram (auto: Gram for float32 at aspect >= 2)
    ns_dtype: str = "auto"  # auto (bfloat16 on GPU/TPU, float32 on CPU) | float32 | bfloat16


@dataclasses.dataclass(frozen=True)
class AuONConfig(MatrixOptimizerConfig):
    name: str = "auon"
    auon_hybrid: bool = False  # one Newton–Schulz step after the AuON normalization


@dataclasses.dataclass(frozen=True)
class MuonHConfig(MuonConfig):
    """MuonH (HyperP): hidden matrices take a relative step of size lr along Muon's direction and
    stay on their init sphere; the readout likewise along Adam's (AdamH); embeddings and vectors
    AdamW at lr * adam_lr_ratio. weight_decay > 0 is applied, with a warning."""

    family: ClassVar[str] = "sphere"

    name: str = "muonh"
    # the default run's optimum: val 1.408, 1.338, 1.339, 1.403 at 2^-6 … 2^-3 (docs/optimizers.md)
    lr: float = 0.04


@dataclasses.dataclass(frozen=True)
class AdamHConfig(AdamWConfig):
    """AdamH: every hidden and output matrix takes a relative step of size lr along Adam's
    direction and stays on its init sphere; embeddings and vectors AdamW at lr * adam_lr_ratio."""

    family: ClassVar[str] = "sphere"

    name: str = "adamh"
    lr: float = 0.02
    adam_lr_ratio: float = 0.5


@dataclasses.dataclass(frozen=True)
class MeZOConfig(OptimizerConfig):
    """MeZO: SGD along a random probe z, its slope (L⁺ − L⁻)/2ε measured by two forward passes
    (optim/mezo.py). Expected step: SGD with per-group LR lr·D·U; the parametrization's SGD
    column gives D² or U² under `matched` and the weight-decay multipliers (vectors: none)."""

    family: ClassVar[str] = "zeroth_order"

    name: str = "mezo"
    lr: float = 1.4e-3  # the fine-tuning optimum measured at the default shape (docs/finetuning.md)
    schedule: str = "constant"  # the paper's; cosine and wsd work too
    warmup_steps: int = 0
    clip_norm: float = 0.0  # clips the projected gradient |g|; 0 disables
    eps: float = 1e-3  # perturbation scale ε
    n_probes: int = 1  # probes averaged per step (2 forward passes each)
    sparsity: float = 0.0  # Sparse MeZO: fraction of each matrix left untouched (0.8 in the paper)
    probe_scaling: str = "isotropic"  # isotropic | matched (D² = the SGD LR multiplier)
    update_scaling: str = "isotropic"  # isotropic | matched (U² = the SGD LR multiplier)
    eps_scaling: str = "constant"  # constant | fan_in (ε·(fan_in/base_fan_in)^-1/2 per group)
    param_dtype: str = "float32"  # float32 | bfloat16 (stored weights, stochastic rounding)
    objective: str = "cross_entropy"  # cross_entropy | accuracy (the loss MeZO minimizes)
    curvature: bool = False  # one more forward per step: (L⁺ + L⁻ − 2L⁰)/ε², the Hessian trace
    curvature_decay: float = 0.9  # its moving average's decay
    safe_lr: float | None = None  # c: the LR is capped at c / (that moving average)


OPTIMIZERS: dict[str, type[OptimizerConfig]] = {
    "adamw": AdamWConfig, "sgd": SGDConfig, "muon": MuonConfig, "auon": AuONConfig,
    "muonh": MuonHConfig, "adamh": AdamHConfig, "mezo": MeZOConfig}
# Families whose matrices live on spheres: a zero-initialized matrix has no sphere.
SPHERE_OPTIMIZERS = tuple(name for name, cls in OPTIMIZERS.items() if cls.family == "sphere")


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
