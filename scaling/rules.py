"""The parametrization tables, one row per role (SCALING_RULES.md §1; Tensor Programs V, Table 3
in the `mup` library's form). Every entry is a width scaling `fan_in_mult**a * fan_out_mult**b`
(times `base`), where `fan_in_mult = fan_in / base_fan_in` and likewise for fan-out.

Check these against the paper line by line; nothing else in the project decides a multiplier.
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
TABLES: dict[str, dict[str, RoleRule]] = {
    # Standard parametrization: fan-in init everywhere, no width multipliers.
    "sp": {
        #                 init_std     forward   adam_lr   adam_eps  adam_wd  sgd_lr  sgd_wd
        "input":  RoleRule(ONE,        ONE,      ONE,      ONE,      ONE,     ONE,    ONE),
        "hidden": RoleRule(W(a=-0.5),  ONE,      ONE,      ONE,      ONE,     ONE,    ONE),
        "output": RoleRule(W(a=-0.5),  ONE,      ONE,      ONE,      ONE,     ONE,    ONE),
        "vector": RoleRule(ONE,        ONE,      ONE,      ONE,      ZERO,    ONE,    ONE),
    },
    # μP (maximal update): hidden LR, ε ∝ 1/m and WD ∝ m for Adam; logits × 1/m.
    "mup": {
        #                 init_std     forward   adam_lr   adam_eps  adam_wd  sgd_lr        sgd_wd
        "input":  RoleRule(ONE,        ONE,      ONE,      ONE,      ONE,     W(b=1),       ONE),
        "hidden": RoleRule(W(a=-0.5),  ONE,      W(a=-1),  W(a=-1),  W(a=1),  W(a=-1, b=1), W(a=1, b=-1)),
        "output": RoleRule(ONE,        W(a=-1),  ONE,      ONE,      ONE,     W(a=1),       ONE),
        "vector": RoleRule(ONE,        ONE,      ONE,      ONE,      ZERO,    W(b=1),       W(b=-1)),
    },
}

# Attention logit scale as a function of head_dim_mult = head_dim / base_head_dim, times
# 1/sqrt(base_head_dim): SP keeps 1/sqrt(d_head), μP uses 1/d_head written as
# sqrt(d_head_base)/d_head so the base is unchanged.
ATTENTION_EXPONENT = {"sp": -0.5, "mup": -1.0}
# fmt: on

# Muon on hidden matrices (SCALING_RULES.md §4): the width factor μP needs on η with each
# update-scale convention (optim/muon.py defines s). keller and spectral already give μP's
# spectral condition, so Adam's 1/m is never stacked on them; moonlight's Adam-like RMS needs
# m^(-1/2). Inputs, outputs and vectors stay on the Adam column above.
# fmt: off
MUON_LR: dict[str, dict[str, W]] = {
    "sp":  {"keller": ONE, "spectral": ONE, "moonlight": ONE},
    "mup": {"keller": ONE, "spectral": ONE, "moonlight": W(a=-0.5)},
}
# LR-coupled decay on hidden Muon matrices: λ constant unless optim.wd_width_exponent sets
# λ ∝ m^γ (γ = −1 is the "decay ∝ 1/width" rule of SCALING_RULES.md §3).
MUON_WD: dict[str, W] = {"sp": ONE, "mup": ONE}
# fmt: on
