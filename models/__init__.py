"""Models whose width and depth are knobs; every parameter carries its scaling role."""

from __future__ import annotations

from flax import nnx

from models.config import ModelConfig
from models.mlp import ByteMLP
from models.tagged import ParamSpec, label_tree, param_specs
from models.transformer import Transformer

MODELS = {"transformer": Transformer, "mlp": ByteMLP}


def create(cfg: ModelConfig, vocab_size: int, *, logit_multiplier: float = 1.0,
           attention_scale: float = 1.0, branch_multiplier: float = 1.0,
           seed: int = 0) -> nnx.Module:
    """The model with unscaled parameters; use `scaling.build_model` for a parametrized one.

    `branch_multiplier` scales every residual branch's output (depth rules)."""
    return MODELS[cfg.kind](cfg, vocab_size, logit_multiplier=logit_multiplier,
                            attention_scale=attention_scale, branch_multiplier=branch_multiplier,
                            rngs=nnx.Rngs(seed))


__all__ = ["ByteMLP", "ParamSpec", "Transformer", "create", "label_tree", "param_specs"]
