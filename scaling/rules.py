"""The building blocks of the parametrization tables (docs/rules.md derives each entry).

A width rule is `base * fan_in_mult**a * fan_out_mult**b`, with `fan_in_mult = fan_in /
base_fan_in` and likewise for fan-out; a role's row says how its init, forward multiplier and
each optimizer column scale. A depth rule scales the parameters inside residual blocks on top of
the width row. The schemes themselves (which rows and rules each uses) are one table in
scaling/schemes.py; nothing else in the project decides a multiplier.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class W:
    """Width scaling `base * fan_in_mult**a * fan_out_mult**b`."""

    a: float = 0.0
    b: float = 0.0
    base: float = 1.0

    def __call__(self, fan_in_mult: float, fan_out_mult: float) -> float:
        return self.base * fan_in_mult**self.a * fan_out_mult**self.b


ONE = W()
ZERO = W(base=0.0)


@dataclasses.dataclass(frozen=True)
class RoleRule:
    """How one role scales. `init_std` multiplies the base std of BASE_STD below."""

    init_std: W
    forward: W
    adam_lr: W
    adam_eps: W
    adam_wd: W  # LR-coupled weight decay
    sgd_lr: W
    sgd_wd: W  # LR-coupled weight decay


# Base std at the base shape, before `init_std`: one-hot inputs are not fan-in normalized.
BASE_STD = {
    "input": lambda sigma, base_fan_in: sigma,
    "hidden": lambda sigma, base_fan_in: sigma * base_fan_in**-0.5,
    "output": lambda sigma, base_fan_in: sigma * base_fan_in**-0.5,
    "vector": lambda sigma, base_fan_in: sigma,
}

# fmt: off
# Standard parametrization: fan-in init everywhere, no width multipliers.
SP_WIDTH: dict[str, RoleRule] = {
    #                 init_std     forward   adam_lr   adam_eps  adam_wd  sgd_lr  sgd_wd
    "input":  RoleRule(ONE,        ONE,      ONE,      ONE,      ONE,     ONE,    ONE),
    "hidden": RoleRule(W(a=-0.5),  ONE,      ONE,      ONE,      ONE,     ONE,    ONE),
    "output": RoleRule(W(a=-0.5),  ONE,      ONE,      ONE,      ONE,     ONE,    ONE),
    "vector": RoleRule(ONE,        ONE,      ONE,      ONE,      ZERO,    ONE,    ONE),
}
# μP (maximal update, Tensor Programs V in the `mup` library's form): hidden LR and ε ∝ 1/m and
# WD ∝ m for Adam; logits × 1/m.
MUP_WIDTH: dict[str, RoleRule] = {
    #                 init_std     forward   adam_lr   adam_eps  adam_wd  sgd_lr        sgd_wd
    "input":  RoleRule(ONE,        ONE,      ONE,      ONE,      ONE,     W(b=1),       ONE),
    "hidden": RoleRule(W(a=-0.5),  ONE,      W(a=-1),  W(a=-1),  W(a=1),  W(a=-1, b=1), W(a=1, b=-1)),
    "output": RoleRule(ONE,        W(a=-1),  ONE,      ONE,      ONE,     W(a=1),       ONE),
    "vector": RoleRule(ONE,        ONE,      ONE,      ONE,      ZERO,    W(b=1),       W(b=-1)),
}
# HyperP: μP's table with logit multiplier 1. μP's 1/m moves into the readout's init (std
# ∝ 1/fan_in): a relative step does not see a matrix's scale, so on the sphere this is μP's
# readout exactly, where a fan-in readout (std ∝ 1/√fan_in) would move the logits like √m.
HYPERP_WIDTH: dict[str, RoleRule] = {
    **MUP_WIDTH,
    "output": RoleRule(W(a=-1),    ONE,      ONE,      ONE,      ONE,     W(a=1),       ONE),
}

# Muon on hidden matrices: the width factor μP needs on η with each update-scale convention
# (optim/muon.py defines the scale s). keller and spectral already give μP's spectral condition,
# so Adam's 1/m is never stacked on them; moonlight's Adam-like RMS needs m^(-1/2). Inputs,
# outputs and vectors stay on the Adam column.
NO_MUON_WIDTH_RULE: dict[str, W] = {"keller": ONE, "spectral": ONE, "moonlight": ONE}
MUP_MUON_LR: dict[str, W] = {"keller": ONE, "spectral": ONE, "moonlight": W(a=-0.5)}
# MuonH and AdamH take a relative step ‖ΔW‖/‖W‖ = η on every matrix they own, the same at every
# width: no width factor (depth: DepthRule.sphere_lr).
SPHERE_LR: dict[str, W] = {"hidden": ONE, "output": ONE}

# The transferable per-role hyperparameters a proxy tunes (`param.*` fields; 1 leaves the table
# alone). Each multiplies one entry of one role's rule at every width, so μP = SP at the base
# shape for any value, and a value tuned at the base width is carried unchanged to any width
# (Tensor Programs V §5 and the `mup` library's input/output multipliers; Everett et al. 2024's
# per-layer constants; Mlodozeniec et al. 2025's per-module multipliers). The hidden LR is the
# reference: the base LR is its LR.
LR_MULTIPLIERS: dict[str, str] = {"input": "input_lr_mult", "output": "output_lr_mult",
                                  "vector": "vector_lr_mult"}  # role -> field, × the role's LR
INIT_MULTIPLIERS: dict[str, str] = {"input": "input_init_mult"}  # × the role's init std
FORWARD_MULTIPLIERS: dict[str, str] = {"output": "output_mult"}  # × the role's forward (logits)
ATTENTION_MULTIPLIER = "attn_mult"  # × the attention logit scale (an inverse temperature)
TUNABLE: tuple[str, ...] = (*LR_MULTIPLIERS.values(), *INIT_MULTIPLIERS.values(),
                            *FORWARD_MULTIPLIERS.values(), ATTENTION_MULTIPLIER)
# fmt: on


@dataclasses.dataclass(frozen=True)
class Depth:
    """Depth scaling `base * r**c` with r = depth / base_depth (blocks), or `base * depth**c`
    when `absolute` (HyperP's branch factor does not reduce to 1 at the base depth)."""

    c: float = 0.0
    base: float = 1.0
    absolute: bool = False

    def __call__(self, depth: int, base_depth: int) -> float:
        return self.base * (depth if self.absolute else depth / base_depth) ** self.c


@dataclasses.dataclass(frozen=True)
class DepthRule:
    """How parameters inside residual blocks scale with depth, on top of the width table.

    Muon's direction is normalized like Adam's, whatever its update scale (which depends on a
    matrix's shape, never on depth), so Muon's hidden matrices take `adam_lr` too."""

    branch: Depth  # forward multiplier on every residual branch's output
    adam_lr: Depth  # hidden matrices and block vectors under Adam (and Muon)
    adam_eps: Depth
    sgd_lr: Depth
    sphere_lr: Depth  # the relative step of MuonH/AdamH on block matrices

    @property
    def scales_branches(self) -> bool:
        """Whether the rule needs residual branches to scale (a model without them can't)."""
        return self.branch != Depth()


def alpha_rule(alpha: float) -> DepthRule:
    """Branch × r^(−α). An Adam-like (normalized) step moves a block's output by η·r^(−α) and L
    blocks add up coherently, so η·r^(1−α) must stay fixed: η ∝ r^(α−1); ε follows the gradient,
    which carries the branch factor (r^(−α)). SGD's step itself carries r^(−α), so its η ∝
    r^(2α−1). Depth-μP: α = 1/2 (Tensor Programs VI); CompleteP: α = 1 (Cerebras, 2025)."""
    normalized = Depth(alpha - 1)
    return DepthRule(branch=Depth(-alpha), adam_lr=normalized, adam_eps=Depth(-alpha),
                     sgd_lr=Depth(2 * alpha - 1), sphere_lr=normalized)


NO_DEPTH_RULE = DepthRule(Depth(), Depth(), Depth(), Depth(), Depth())
# HyperP: branches × 1/√(2L), absolute; its base-LR law is global (Scheme.lr_law)
HYPERP_DEPTH = dataclasses.replace(NO_DEPTH_RULE, branch=Depth(c=-0.5, base=2**-0.5,
                                                               absolute=True))


@dataclasses.dataclass(frozen=True)
class StepRule:
    """One parameter group's column of a table, for one optimizer: how its LR, ε and weight
    decay scale with width, and (inside residual blocks) its LR and ε with depth."""

    lr: W
    eps: W
    weight_decay: W
    lr_depth: Depth = Depth()
    eps_depth: Depth = Depth()
