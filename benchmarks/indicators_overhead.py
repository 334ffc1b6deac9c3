"""Train-step time with the stability indicators against the same step without them.

    python benchmarks/indicators_overhead.py --out indicators_overhead.json

Three train steps on the Transformer of `build_model` (default shape: width 128, depth 4, batch
32 × 128, μP, AdamW at its defaults), in one process:

- plain: the gradient and the optimizer's update, measuring nothing (written here, the peer);
- clipping: `Measure(indicators=False)`, the gradient's global norm and the clip factor only
  (`logging.indicators=false`);
- indicators: `Measure(indicators=True)`, the default: also the forward stats (attention Z,
  branch and logit RMS, outliers) and the update/weight ratio per group.

Spectral logging adds one `SpectralLog` call every `logging.spectral_every` steps: its median
call time divided by that cadence is added to the indicators' step time.

Each program is compiled and run once to warm up. Each repeat then runs --steps-per-repeat steps
of every program in turn (interleaved, as the machine may be shared) and reads the measured
values at the end, as the loop does at a logged step. Overhead ratio = median over repeats of a
program's time / the plain program's time (the target: below 1.05), in wall time and in the
process's CPU time (all threads), which a machine shared with other work disturbs less. All
three start from the same state on the same batch, so their parameters must end bit for bit
equal (`same_params`).
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from models.config import ModelConfig
from optim import AdamWConfig
from scaling.config import LoggingConfig, ParamConfig
from scaling.files import write_json_atomic
from scaling.parametrization import build_model
from scaling.spectral import SpectralLog
from scaling.steps.backprop import Measure, init_train_state, make_train_step, optimizer_at
from scaling.steps.loss import next_token_loss

VOCAB = 256  # bytes
PROGRAMS = ("plain", "clipping", "indicators")


def plain_step(graphdef, tx_at):
    """The train step without any measuring: the gradient, the update, the loss sum."""

    def step(state, inputs_BxT, targets_BxT):
        loss, grads = jax.value_and_grad(
            lambda p: next_token_loss(graphdef, p, inputs_BxT, targets_BxT))(state.params)
        updates, opt_state = tx_at(state.lr).update(grads, state.opt_state, state.params)
        return dataclasses.replace(state, params=optax.apply_updates(state.params, updates),
                                   opt_state=opt_state, loss_sum=state.loss_sum + loss,
                                   loss_count=state.loss_count + 1)

    return jax.jit(step, donate_argnums=0)


def build(args):
    model, parametrization = build_model(ModelConfig(width=args.width, depth=args.depth),
                                         ParamConfig(), VOCAB, seed=0)
    graphdef, params = nnx.split(model)
    params = params.to_pure_dict()
    cfg = AdamWConfig()
    tx = optimizer_at(cfg, parametrization, total_steps=1000)
    steps = {"plain": plain_step(graphdef, tx),
             **{name: make_train_step(graphdef, tx, Measure(parametrization.labels(),
                                                            cfg.clip_norm, indicators=on))
                for name, on in (("clipping", False), ("indicators", True))}}
    states = {name: init_train_state(jax.tree.map(jnp.copy, params), tx, cfg.lr)
              for name in PROGRAMS}
    tokens = jax.random.randint(jax.random.key(0), (args.batch_size, args.seq_len + 1), 0, VOCAB)
    stacked = jax.tree.map(lambda x: x[None], params)  # the log takes runs stacked
    return steps, states, (tokens[:, :-1], tokens[:, 1:]), SpectralLog(
        stacked, parametrization.specs, runs=1)


def run(step, state, batch, n: int):
    """n steps; the measured values of the last are read, as at a logged step."""
    measured = None
    for _ in range(n):
        out = step(state, *batch)
        state, measured = out if isinstance(out, tuple) else (out, None)
    jax.block_until_ready(state)
    return state, jax.device_get(measured)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--steps-per-repeat", type=int, default=3)
    parser.add_argument("--spectral-every", type=int, default=LoggingConfig().spectral_every)
    parser.add_argument("--out", type=Path, help="also write the results here as JSON")
    args = parser.parse_args()
    steps, states, batch, spectral = build(args)
    for name in PROGRAMS:  # compile and warm up
        states[name], _ = run(steps[name], states[name], batch, 1)
    times = {clock: {name: [] for name in PROGRAMS} for clock in ("wall", "cpu")}
    for _ in range(args.repeats):
        for name in PROGRAMS:
            wall, cpu = time.perf_counter(), time.process_time()
            states[name], _ = run(steps[name], states[name], batch, args.steps_per_repeat)
            times["wall"][name].append((time.perf_counter() - wall) / args.steps_per_repeat)
            times["cpu"][name].append((time.process_time() - cpu) / args.steps_per_repeat)
    params = jax.tree.map(lambda x: x[None], states["indicators"].params)
    spectral(params)  # compiles; its first call also converges the random start vectors
    spectral_s = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        spectral(params)
        spectral_s.append(time.perf_counter() - started)
    same_params = all(
        all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(states["plain"].params),
                                                 jax.tree.leaves(states[name].params),
                                                 strict=True))
        for name in PROGRAMS[1:])
    ratio = {clock: {name: statistics.median(t / p for t, p in zip(
        times[clock][name], times[clock]["plain"], strict=True)) for name in PROGRAMS}
        for clock in times}
    step_ms = {clock: {name: 1e3 * statistics.median(times[clock][name]) for name in PROGRAMS}
               for clock in times}
    spectral_ms = 1e3 * statistics.median(spectral_s)
    per_step = spectral_ms / args.spectral_every if args.spectral_every else 0.0
    with_spectral = ratio["wall"]["indicators"] + per_step / step_ms["wall"]["plain"]
    print(f"width={args.width} depth={args.depth} batch={args.batch_size}x{args.seq_len} "
          f"on {jax.devices()[0].device_kind}: step (median of {args.repeats}), wall / CPU")
    for name in PROGRAMS:
        print(f"  {name:<11} {step_ms['wall'][name]:8.1f} / {step_ms['cpu'][name]:8.1f} ms   "
              f"ratio to plain {ratio['wall'][name]:.3f} / {ratio['cpu'][name]:.3f}")
    print(f"  spectral log {spectral_ms:.1f} ms a call, every {args.spectral_every} steps: "
          f"indicators + spectral ratio {with_spectral:.3f} (wall); same parameters: "
          f"{same_params}")
    if args.out is not None:
        write_json_atomic(args.out, {
            "command": shlex.join([Path(sys.executable).name, *sys.argv]),
            "device": jax.devices()[0].device_kind, "width": args.width, "depth": args.depth,
            "batch_size": args.batch_size, "seq_len": args.seq_len, "step_ms": step_ms,
            "ratio": ratio, "spectral_ms": spectral_ms, "spectral_every": args.spectral_every,
            "ratio_with_spectral": with_spectral, "same_params": same_params})


if __name__ == "__main__":
    main()
