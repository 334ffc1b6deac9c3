"""Coordinate check (TP-V, the `mup` library's check): the RMS of every module's output at init
and after a few optimizer steps on one fixed batch, across widths (`coordinate_check`) or across
depths (`depth_check`, TP-VI). Under μP the curves are flat in width; under a depth rule
(Depth-μP, CompleteP) they are flat in depth too.

Besides the model's own forward stats it records `logits_delta`, the RMS of the change of the
logits since init. With readout_init='normal', μP's init logits shrink like 1/sqrt(m) by design
(constant readout std, logits × 1/m), and so do the parts of the change that go through the init
readout; only the readout's own update gives a Θ(1) change. readout_init='zero' removes the
vanishing terms, which otherwise dominate at small widths."""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from models.config import ModelConfig
from models.layers import rms
from optim import OptimizerConfig
from scaling.config import ParamConfig
from scaling.parametrization import build_model
from scaling.training.step import init_train_state, make_train_step, optimizer_at

# width (depth for depth_check) -> step (0 = init) -> module name ("logits", "attn_out/0", ...)
# -> RMS of its output
CoordStats = dict[int, dict[int, dict[str, float]]]


def _flatten(stats: dict[str, jax.Array]) -> dict[str, float]:
    """Per-layer stats (shape (depth,)) become one entry per layer: 'attn_out/0', 'attn_out/1'."""
    out: dict[str, float] = {}
    for name, value in stats.items():
        if value.ndim == 0:
            out[name] = float(value)
        else:
            out.update({f"{name}/{i}": float(v) for i, v in enumerate(value)})
    return out


def _one_model(model_cfg: ModelConfig, param_cfg: ParamConfig, optim_cfg: OptimizerConfig,
               steps: int, inputs_BxT: jax.Array, targets_BxT: jax.Array, vocab_size: int,
               seed: int) -> dict[int, dict[str, float]]:
    model, parametrization = build_model(model_cfg, param_cfg, vocab_size, seed)
    tx = optimizer_at(optim_cfg, parametrization, total_steps=max(steps, 1))
    graphdef, params = nnx.split(model)
    params = params.to_pure_dict()
    forward = jax.jit(lambda p: nnx.merge(graphdef, p).forward(inputs_BxT))
    logits0_BxTxV = forward(params)[0]

    def measure(p) -> dict[str, float]:
        logits_BxTxV, stats = forward(p)
        return _flatten(stats) | {"logits_delta": float(rms(logits_BxTxV - logits0_BxTxV))}

    train_step = make_train_step(graphdef, tx)
    state = init_train_state(params, tx, optim_cfg.lr)
    out = {0: measure(state["params"])}
    for step in range(1, steps + 1):
        state = train_step(state, inputs_BxT, targets_BxT)
        out[step] = measure(state["params"])
    return out


def coordinate_check(model_cfg: ModelConfig, param_cfg: ParamConfig, optim_cfg: OptimizerConfig,
                     widths: list[int], steps: int, batch: tuple[jax.Array, jax.Array], *,
                     vocab_size: int = 256, seed: int = 0) -> CoordStats:
    """Trains `steps` steps on `batch` = (inputs_BxT, targets_BxT) at each width, recording
    the model's forward stats (`model.forward(inputs)[1]`) before the first step and after each."""
    return {width: _one_model(dataclasses.replace(model_cfg, width=width), param_cfg, optim_cfg,
                              steps, *batch, vocab_size, seed)
            for width in widths}


def depth_check(model_cfg: ModelConfig, param_cfg: ParamConfig, optim_cfg: OptimizerConfig,
                depths: list[int], steps: int, batch: tuple[jax.Array, jax.Array], *,
                vocab_size: int = 256, seed: int = 0) -> CoordStats:
    """`coordinate_check` across depths (number of blocks) at `model_cfg`'s width: the outer
    key of the result is the depth, and the per-layer stats run to 'block_out/{depth - 1}'."""
    return {depth: _one_model(dataclasses.replace(model_cfg, depth=depth), param_cfg, optim_cfg,
                              steps, *batch, vocab_size, seed)
            for depth in depths}
