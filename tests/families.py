"""The optimizer config that reads each column of the rule tables, for tests that check a
column's multipliers: adam (AdamW), sgd (SGD), muon (Muon, with its update scale), sphere
(MuonH), zeroth_order (MeZO)."""

from __future__ import annotations

from optim import AdamWConfig, MeZOConfig, MuonConfig, MuonHConfig, OptimizerConfig, SGDConfig

COLUMNS = {"adam": AdamWConfig, "sgd": SGDConfig, "muon": MuonConfig, "sphere": MuonHConfig,
           "zeroth_order": MeZOConfig}


def column(name: str, update_scale: str | None = None,
           wd_width_exponent: float | None = None) -> OptimizerConfig:
    fields = {"wd_width_exponent": wd_width_exponent}
    if update_scale is not None:
        fields["update_scale"] = update_scale
    return COLUMNS[name](**fields)
