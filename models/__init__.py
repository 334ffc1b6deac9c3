"""Models whose width and depth are knobs; every parameter carries its scaling role."""

from __future__ import annotations

import jax
from flax import nnx

from models.config import ModelConfig, Runtime
from models.factory import FactoryModel
from models.mlp import ByteMLP
from models.tagged import ParamSpec, label_tree, param_specs
from models.transformer import Transformer

MODELS = {"transformer": Transformer, "mlp": ByteMLP}


def create(cfg: ModelConfig, vocab_size: int, runtime: Runtime = Runtime(),
           seed: int | jax.Array = 0) -> nnx.Module:
    """The model with unscaled parameters, built with `runtime`'s multipliers and activation
    placement; use `scaling.parametrization.build_model` for a parametrized one. `seed`: an
    integer or a key."""
    model = FactoryModel if cfg.factory is not None else MODELS[cfg.kind]
    return model(cfg, vocab_size, runtime, rngs=nnx.Rngs(seed))


__all__ = ["ByteMLP", "FactoryModel", "ParamSpec", "Runtime", "Transformer", "create", "label_tree",
           "param_specs"]
