"""Optimizers as optax transformations, configured per parameter role."""

from optim.build import build_optimizer
from optim.schedules import learning_rate, relative_schedule

__all__ = ["build_optimizer", "learning_rate", "relative_schedule"]
