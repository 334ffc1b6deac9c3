"""The parametrization schemes, one record each, in one table (docs/rules.md derives them).

A scheme is everything about one parametrization: its width table (a row per role), its depth
rule for the parameters inside residual blocks, the attention logit exponent, Muon's width factor
per update-scale convention, the law its base LR follows across sizes (scaling/laws.py), how reports
name and order it, and along which axes it claims a model's coordinates stay flat (what the
coordinate check holds it to, and what transfer relies on). `param.name` picks one by its name;
nothing else in the project tests a scheme's name. A new scheme is one entry of SCHEMES.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from scaling.laws import ARCHSCALE, MUON_MEASURED, TABLES, LRLaw
from scaling.rules import (
    HYPERP_DEPTH,
    HYPERP_WIDTH,
    MUP_MUON_LR,
    MUP_WIDTH,
    NO_DEPTH_RULE,
    NO_MUON_WIDTH_RULE,
    ONE,
    SP_WIDTH,
    SPHERE_LR,
    DepthRule,
    RoleRule,
    StepRule,
    W,
    alpha_rule,
)

WIDTH, DEPTH = "width", "depth"  # the axes a scheme may claim flat


@dataclasses.dataclass(frozen=True)
class Scheme:
    """One parametrization. Its `adam`, `sgd`, `muon` and `sphere` columns are what optimizer
    configs read for each role (optim.OptimizerConfig.rule_for)."""

    name: str  # param.name
    label: str  # how tables, plots and transfer explanations print it
    width: Mapping[str, RoleRule]  # a row per role
    depth: DepthRule
    attention_exponent: float  # logit scale × head_dim_mult**exponent (SP −½, μP −1)
    muon_lr: Mapping[str, W]  # Muon's width factor per update-scale convention
    flat_in: tuple[str, ...]  # axes along which it claims Θ(1) coordinates (WIDTH, DEPTH)
    lr_law: LRLaw = TABLES  # how scaling-transfer moves its base LR by default
    # optimizer name -> the law measured for that optimizer under this scheme, where it differs
    optimizer_laws: Mapping[str, LRLaw] = dataclasses.field(default_factory=dict)
    readout_on_sphere: bool = False  # its readout needs a normal init (a sphere to live on)

    def law_for(self, optimizer: str) -> LRLaw:
        """The base-LR law scaling-transfer applies to a proxy trained by `optimizer`."""
        return self.optimizer_laws.get(optimizer, self.lr_law)

    def adam(self, role: str) -> StepRule:
        row = self.width[role]
        return StepRule(row.adam_lr, row.adam_eps, row.adam_wd, self.depth.adam_lr,
                        self.depth.adam_eps)

    def sgd(self, role: str) -> StepRule:
        row = self.width[role]
        return StepRule(row.sgd_lr, ONE, row.sgd_wd, self.depth.sgd_lr)

    def muon(self, role: str, update_scale: str) -> StepRule:
        if update_scale not in self.muon_lr:
            raise ValueError(f"optim.update_scale={update_scale!r}: expected one of "
                             f"{sorted(self.muon_lr)}")
        return StepRule(self.muon_lr[update_scale], ONE, ONE, self.depth.adam_lr)

    def sphere(self, role: str) -> StepRule:
        return StepRule(SPHERE_LR[role], self.width[role].adam_eps, ONE, self.depth.sphere_lr,
                        self.depth.adam_eps)


# fmt: off
SCHEMES: dict[str, Scheme] = {s.name: s for s in (
    #      name         label        width         depth            attn  muon_lr             flat_in
    Scheme("sp",        "SP",        SP_WIDTH,     NO_DEPTH_RULE,   -0.5, NO_MUON_WIDTH_RULE, ()),
    Scheme("mup",       "μP",        MUP_WIDTH,    NO_DEPTH_RULE,   -1.0, MUP_MUON_LR,        (WIDTH,),
           optimizer_laws={"muon": MUON_MEASURED}),
    Scheme("depth_mup", "Depth-μP",  MUP_WIDTH,    alpha_rule(0.5), -1.0, MUP_MUON_LR,        (WIDTH, DEPTH)),
    Scheme("completep", "CompleteP", MUP_WIDTH,    alpha_rule(1.0), -1.0, MUP_MUON_LR,        (WIDTH, DEPTH)),
    Scheme("hyperp",    "HyperP",    HYPERP_WIDTH, HYPERP_DEPTH,    -1.0, MUP_MUON_LR,        (WIDTH,),
           lr_law=ARCHSCALE, readout_on_sphere=True),
)}
# fmt: on


def label(name: str) -> str:
    """How reports print a scheme named in a result file (an unknown name as itself)."""
    return SCHEMES[name].label if name in SCHEMES else name


def order(name: str) -> int:
    """A scheme's place in reports: the table's order, unknown names last."""
    return list(SCHEMES).index(name) if name in SCHEMES else len(SCHEMES)
