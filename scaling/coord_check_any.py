"""The coordinate check for any NNX model (scaling.any_model): the RMS of every module's output,
captured with nnx.capture (as the `mup` library hooks every module), at init and after each of
a few steps on one fixed batch, across widths; judged by the slopes of scaling/coord_check.py.

The model's own output is 'logits' (and its change since init 'logits_delta'); modules on the
readout's path (those holding an output-role parameter, and the ReadoutMultiplier) are left out:
under μP the raw readout grows with width by design and only its multiplied output is Θ(1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
from flax import nnx

from models.capture import module_outputs
from models.layers import rms
from optim import OptimizerConfig
from scaling.any_model import (
    ModelFn,
    build_optimizer,
    infer_parametrization,
    initialize,
    make_train_step,
)
from scaling.coord_check import (
    CoordStats,
    Slope,
    mean_over_runs,
    readout_warnings,
    slope_rows,
    trajectory,
    update_rms,
)
from scaling.schemes import WIDTH

LOGITS = "logits"


class _State(NamedTuple):
    params: dict
    opt_state: Any


def _one_shape(make: ModelFn, loss_fn, scheme: str, optimizer: OptimizerConfig, width: int,
               base_width: int, batch, steps: int, seeds: Sequence[int]
               ) -> dict[int, dict[str, float]]:
    """The mean over `seeds` of every quantity at init and after each step; one compiled
    forward and step serve every seed (the graph is the same, the parameters differ)."""
    parametrization = infer_parametrization(make, scheme=scheme, width=width,
                                            base_width=base_width)
    models = [initialize(make(width), parametrization, seed) for seed in seeds]
    graphdef = nnx.split(models[0])[0]
    skipped = set(parametrization.readout_modules)

    @jax.jit
    def forward(params, x):
        output, stats = module_outputs(nnx.merge(graphdef, params), x, skipped=skipped)
        return output, {**stats, LOGITS: rms(output)}

    tx = build_optimizer(optimizer, parametrization, total_steps=max(steps, 1))
    step = make_train_step(graphdef, tx, loss_fn, gradient=optimizer.needs_gradient)

    def train_step(state: _State, x, y):
        return _State(*step(state.params, state.opt_state, x, y)[:2]), None

    updates = jax.jit(lambda a, b: update_rms(a, b, parametrization.specs))
    runs = []
    for model in models:
        params = nnx.split(model)[1].to_pure_dict()
        runs.append(trajectory(forward, train_step, updates, _State(params, tx.init(params)),
                               steps, *batch))
    return mean_over_runs(runs)


def coordinate_check(make: ModelFn, loss_fn: Callable, batch, optimizer: OptimizerConfig, *,
                     widths: Sequence[int], base_width: int,
                     schemes: Sequence[str] = ("sp", "mup"), steps: int = 3, seeds: int = 2,
                     seed: int = 0) -> dict[str, CoordStats]:
    """scheme -> width -> step -> quantity -> RMS (the mean over `seeds` initializations),
    training `make`'s model with `optimizer` on `batch` = (x, y) under `loss_fn(model, x, y)`."""
    return {scheme: {width: _one_shape(make, loss_fn, scheme, optimizer, width, base_width,
                                       batch, steps, list(range(seed, seed + seeds)))
                     for width in widths}
            for scheme in schemes}


def rows(stats: dict[str, CoordStats], readout_init: str = "normal") -> list[Slope]:
    """Every fitted slope across width (scaling.coord_check.slope_rows): each scheme held to
    the flatness its record claims."""
    return slope_rows(stats, WIDTH, readout_init)


__all__ = ["coordinate_check", "module_outputs", "readout_warnings", "rows"]
