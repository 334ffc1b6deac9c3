"""The train state every step kind carries: parameters, the optimizer's state, the LR, and the
running sums of the steps since the last log (so a resumed window averages the same steps)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    params: Any
    opt_state: Any  # the step kind's own: an optax state, or MeZO's ZOState
    lr: jax.Array  # the base LR, in the state so that one program trains several
    loss_sum: jax.Array  # the train losses since the last log
    loss_count: jax.Array
    clipped_sum: jax.Array  # steps clipped since the last log
    clip_scale_sum: jax.Array  # the clip factors since the last log

    @classmethod
    def start(cls, params, opt_state, lr: float) -> TrainState:
        zero = lambda: jnp.zeros((), jnp.float32)  # one buffer each: the step donates them
        return cls(params, opt_state, jnp.asarray(lr, jnp.float32), zero(),
                   jnp.zeros((), jnp.int32), zero(), zero())

    def counted(self, loss: jax.Array, clipped: jax.Array, clip_scale: jax.Array, **changes
                ) -> TrainState:
        """The state after one more step with this loss and clipping, and `changes`."""
        return dataclasses.replace(
            self, loss_sum=self.loss_sum + loss, loss_count=self.loss_count + 1,
            clipped_sum=self.clipped_sum + clipped.astype(jnp.float32),
            clip_scale_sum=self.clip_scale_sum + clip_scale, **changes)

    def window(self) -> dict[str, jax.Array]:
        """The means over the steps since the last log: train loss, clipped fraction, clip
        factor (one value per run when runs are stacked)."""
        count = self.loss_count
        return {"train_loss": self.loss_sum / count, "clipped_fraction": self.clipped_sum / count,
                "mean_clip_scale": self.clip_scale_sum / count}

    def next_window(self) -> TrainState:
        return dataclasses.replace(
            self, loss_sum=jnp.zeros_like(self.loss_sum),
            loss_count=jnp.zeros_like(self.loss_count),
            clipped_sum=jnp.zeros_like(self.clipped_sum),
            clip_scale_sum=jnp.zeros_like(self.clip_scale_sum))

    def run(self, index: int) -> TrainState:
        """One run's state from runs stacked on a leading axis."""
        return jax.tree.map(lambda x: x[index], self)

    @staticmethod
    def stack(states: list[TrainState]) -> TrainState:
        """Runs stacked on a leading axis, for one program to train them together."""
        return jax.tree.map(lambda *xs: jnp.stack(xs), *states)

    def as_dict(self) -> dict[str, Any]:
        """The checkpointed layout: a dict of the fields."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainState:
        return cls(**values)


def over_runs(fn, runs: int | None, in_axes: tuple[int | None, ...]):
    """`fn` of one run, over `runs` runs stacked on a leading axis of the arguments `in_axes`
    marks 0 (the others shared); every output stacked. None: `fn` itself, on one unstacked run.

    A stack of one is unstacked and restacked (free reshapes) rather than vmapped: under vmap a
    scan over stacked layers takes its weights with the run axis moved behind the layer axis,
    a copy of every stacked weight (measured on MeZO's estimate: its temporaries grew by a
    layer's weights per layer)."""
    if runs is None:
        return fn
    if runs > 1:
        return jax.vmap(fn, in_axes=in_axes)

    @functools.wraps(fn)  # the program keeps its name (logs, compilation cache)
    def one_run(*args):
        args = [arg if axis is None else jax.tree.map(lambda x: x[0], arg)
                for arg, axis in zip(args, in_axes, strict=True)]
        return jax.tree.map(lambda x: x[None], fn(*args))

    return one_run
