"""Optimizers as optax transformations, configured per parameter role (jax and optax only)."""

from optim.build import RoleMultipliers, build_optimizer, role_of
from optim.config import (
    OPTIMIZERS,
    AdamHConfig,
    AdamWConfig,
    AuONConfig,
    MeZOConfig,
    MuonConfig,
    MuonHConfig,
    OptimizerConfig,
    SGDConfig,
    optimizer_config,
)
from optim.mezo import LeafProbe
from optim.mezo_optax import zo_gradient
from optim.schedules import learning_rate, relative_schedule
from optim.sphere import scale_to_sphere
from optim.trees import MatrixAxes

__all__ = ["OPTIMIZERS", "AdamHConfig", "AdamWConfig", "AuONConfig", "LeafProbe", "MatrixAxes",
           "MeZOConfig", "MuonConfig", "MuonHConfig", "OptimizerConfig", "RoleMultipliers",
           "SGDConfig", "build_optimizer", "learning_rate", "optimizer_config",
           "relative_schedule", "role_of", "scale_to_sphere", "zo_gradient"]
