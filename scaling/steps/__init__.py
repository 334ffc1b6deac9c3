"""Step kinds: how one run (or a stack of runs) takes a step, behind one interface.

A step kind is built for an optimizer config, a parametrization and a model's graphdef; it
makes the initial train state, takes a compiled step `(state, inputs, targets) -> (state,
measured)`, says what each logged record gets from it (`log_values`), and what its own per-step
log holds (`step_records`, into `log_name`; None: none). The training loop, the coordinate
check and the benchmarks use this interface and know nothing else about the optimizer.
"""

from __future__ import annotations

from typing import Protocol

import jax

from optim import OptimizerConfig
from scaling.parametrization import Parametrization
from scaling.steps.backprop import BackpropStep
from scaling.steps.state import TrainState
from scaling.steps.zeroth_order import ZerothOrderStep


class Step(Protocol):
    log_name: str | None  # a per-step log beside metrics.jsonl
    metric_names: tuple[str, ...]  # what log_values gives that is not a stability indicator

    def init_state(self, params, lr: float) -> TrainState: ...

    def __call__(self, state: TrainState, inputs_BxT: jax.Array, targets_BxT: jax.Array
                 ) -> tuple[TrainState, dict]: ...

    def compile(self, state: TrainState, inputs_BxT: jax.ShapeDtypeStruct,
                targets_BxT: jax.ShapeDtypeStruct): ...  # the memory analysis, or None

    def step_records(self, state: TrainState, step: int) -> list[dict] | None: ...

    def log_values(self, state: TrainState, inputs_BxT: jax.Array, measured: dict) -> dict: ...


def make_step(cfg: OptimizerConfig, parametrization: Parametrization, graphdef, *,
              total_steps: int, runs: int | None = None, indicators: bool = True,
              shardings=None, stack=None, seed: int = 0, grad_accum: int = 1) -> Step:
    """The step kind of `cfg`: backprop, or zeroth-order for an optimizer that needs no
    gradient. `runs`: states stacked on a leading axis and trained together (None: one
    state); `shardings`: one run's state layout on a device mesh; `stack`: Muon's placement
    there; `seed`: MeZO's probes; `grad_accum`: micro-batches per gradient (backprop only)."""
    kind = BackpropStep if cfg.needs_gradient else ZerothOrderStep
    return kind(cfg, parametrization, graphdef, total_steps=total_steps, runs=runs,
                indicators=indicators, shardings=shardings, stack=stack, seed=seed,
                grad_accum=grad_accum)


__all__ = ["Step", "TrainState", "make_step"]
