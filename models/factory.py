"""A language model from the user's own code (`model.factory=package.module:function`), in the
interface the training loop, the coordinate check and the sweeps use."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable

import jax
from flax import nnx

from models.capture import module_outputs
from models.config import ModelConfig, Runtime
from models.layers import LayerTransform, rms
from models.multipliers import apply_runtime
from models.tagged import iter_params

FACTORY_SIGNATURE = "function(cfg: ModelConfig, vocab_size: int, *, rngs: nnx.Rngs)"


def load_factory(spec: str) -> Callable[..., nnx.Module]:
    """The function `spec` = 'package.module:function' names; ValueError saying what is wrong."""
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise ValueError(f"model.factory={spec!r}: expected 'package.module:function'")
    try:
        factory = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"model.factory={spec!r}: cannot import it ({error}); expected an "
                         f"importable {FACTORY_SIGNATURE}") from None
    if not callable(factory):
        raise TypeError(f"model.factory={spec!r}: not callable; expected {FACTORY_SIGNATURE}")
    return factory


class FactoryModel(nnx.Module):
    """The user's model (tokens_BxT -> logits_BxTxV) with its forward multipliers set from the
    runtime; its forward stats are every module's output RMS (models.capture)."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, runtime: Runtime, *, rngs: nnx.Rngs):
        self.net = apply_runtime(load_factory(cfg.factory)(cfg, vocab_size, rngs=rngs), runtime)
        # paths (inside net) of the modules on the readout's path: raw readouts, not checked
        self.readout_modules = tuple(path[1:] for path in runtime.readout_modules)

    def forward(self, tokens_BxT: jax.Array, layer_transform: LayerTransform | None = None):
        if layer_transform is not None:
            raise ValueError("a model.factory model has no layers to perturb lazily: expected a "
                             "gradient optimizer (for MeZO, compose optim.zo_gradient with optax "
                             "from Python)")
        logits_BxTxV, stats = module_outputs(self.net, tokens_BxT,
                                             skipped=self.readout_modules)
        return logits_BxTxV, {**stats, "logits": rms(logits_BxTxV)}

    def flops_per_token(self, seq_len: int) -> float:
        """6 per parameter (Kaplan et al.): its tables and attention are not told apart."""
        return 6.0 * sum(math.prod(p.shape) for _, p in iter_params(self))

    def __call__(self, tokens_BxT, layer_transform: LayerTransform | None = None):
        return self.forward(tokens_BxT, layer_transform)[0]
