"""Optimizers as optax transformations, configured per parameter role (jax and optax only)."""

from optim.build import MATRIX_ROLES, RoleMultipliers, build_optimizer
from optim.config import (
    OPTIMIZERS,
    AdamWConfig,
    AuONConfig,
    MuonConfig,
    OptimizerConfig,
    SGDConfig,
    optimizer_config,
)
from optim.muon import MatrixAxes
from optim.schedules import learning_rate, relative_schedule

__all__ = ["MATRIX_ROLES", "OPTIMIZERS", "AdamWConfig", "AuONConfig", "MatrixAxes", "MuonConfig",
           "OptimizerConfig", "RoleMultipliers", "SGDConfig", "build_optimizer", "learning_rate",
           "optimizer_config", "relative_schedule"]
