"""Cost of sharding: the default model's train step on a mesh against one device, and Muon's
optimizer step with stacked matrices against letting the compiler split the NS matmuls.

    python benchmarks/sharding.py --devices 8 --repeats 5 --out sharding.json

On CPU the devices are simulated (XLA_FLAGS=--xla_force_host_platform_device_count, set here
before JAX starts) and share the machine's cores: the ratio is the price of splitting one
step's work into per-device programs plus their collectives, not a speed-up to expect. On a GPU
or TPU machine the devices are the real ones (--devices is then ignored).

Rows (the default run: `scaling-train`'s model, μP, AdamW, batch 32 × 128 tokens):
- `single`: no mesh (mesh=single), the baseline;
- `fsdp`, `data`: mesh=fsdp / mesh=data over every device;
and Muon's update alone (`tx.update` + apply, random gradients) on mesh=fsdp:
- `stack` (optim.ns_sharding=stack, whole matrices per device) against
- `compiler` (optim.ns_sharding=compiler: the NS matmuls split as the parameters are).
Each ratio is the median over repeats of (row / baseline) timed in the same repeat, the
programs interleaved because the machine is shared.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from pathlib import Path


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=8,
                        help="simulated CPU devices (when run as a script, on CPU)")
    parser.add_argument("--meshes", nargs="+", default=["single", "fsdp", "data"],
                        help="mesh options of the train-step rows; the first is the baseline")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="steps per timing")
    parser.add_argument("--widths", type=int, nargs="+", default=[128, 512],
                        help="model widths of the Muon rows")
    parser.add_argument("--out", type=Path, help="JSON of the results")
    parser.add_argument("overrides", nargs="*", help="scaling-train overrides of the model")
    return parser.parse_args()


if __name__ == "__main__" and "device_count" not in os.environ.get("XLA_FLAGS", ""):
    # before JAX starts; imported (benchmarks/gpu_suite.py), the devices are the real ones
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={_parse().devices}")

import jax
import numpy as np
import optax

from experiments.compose import compose, to_run_config
from scaling.sharding import place
from scaling.training import data
from scaling.training.files import write_json_atomic
from scaling.training.loop import _init_state, _optimizer_setup, model_on_mesh
from scaling.training.step import make_train_step

VOCAB = 256


def train_program(overrides: list[str]):
    """(step, state, batch) of the run `overrides` describe, placed on its mesh."""
    cfg = to_run_config(compose(overrides))
    _, graphdef, params, parametrization, layout = model_on_mesh(cfg, VOCAB)
    setup = _optimizer_setup(cfg, parametrization, layout)
    state = _init_state(cfg, setup, params, cfg.optim.lr)
    shardings = None if layout is None else layout.state(state, parametrization.specs)
    step = make_train_step(graphdef, setup, 1, None, shardings)
    tokens = np.random.default_rng(0).integers(0, VOCAB, 1 << 16).astype(np.uint16)
    batch = data.train_batch(tokens, 0, 0, cfg.train.batch_size, cfg.train.seq_len)
    if layout is not None:
        state, batch = place(state, shardings), place(batch, (layout.batch,) * 2)
    return step, state, batch


def muon_program(overrides: list[str]):
    """(update, state) of Muon's step alone: tx.update + apply on fixed random gradients."""
    cfg = to_run_config(compose(["optim=muon", "optim.clip_norm=0", *overrides]))
    _, _, params, parametrization, layout = model_on_mesh(cfg, VOCAB)
    tx = _optimizer_setup(cfg, parametrization, layout)(cfg.optim.lr)
    state = {"params": params, "opt_state": tx.init(params)}
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), p.shape), params)
    shardings = layout.state(state, parametrization.specs)
    state = place(state, shardings)
    grads = place(grads, shardings["params"])

    @jax.jit
    def update(state):
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        return jax.lax.with_sharding_constraint(
            {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state},
            shardings)

    return update, state


def _timed(run, state, steps: int):
    """(seconds per call, state after), after one warm-up call."""
    state = run(state)
    jax.block_until_ready(state)
    started = time.perf_counter()
    for _ in range(steps):
        state = run(state)
    jax.block_until_ready(state)
    return (time.perf_counter() - started) / steps, state


def compare(programs: dict, baseline: str, repeats: int, steps: int) -> dict:
    """Per row: median seconds per call and median ratio to the baseline's same repeat."""
    runs = {name: list(p) for name, p in programs.items()}
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, entry in runs.items():
            seconds, entry[1] = _timed(entry[0], entry[1], steps)
            times[name].append(seconds)
    return {name: {"ms": 1e3 * statistics.median(t),
                   "ratio": statistics.median(a / b for a, b in zip(t, times[baseline], strict=True))}
            for name, t in times.items()}


def main() -> dict:
    args = _parse()
    model = args.overrides
    print(f"devices: {jax.device_count()} × {jax.devices()[0].platform}", flush=True)
    steps = {}
    for mesh in args.meshes:
        step, state, batch = train_program([*model, f"mesh={mesh}"])
        steps[mesh] = (lambda s, step=step, batch=batch: step(s, *batch), state)
    train = compare(steps, args.meshes[0], args.repeats, args.steps)
    muon = {}
    for width in args.widths:
        rows = {kind: muon_program([*model, f"model.width={width}", "mesh=fsdp",
                                    f"optim.ns_sharding={kind}"]) for kind in ("stack", "compiler")}
        muon[width] = compare(rows, "compiler", args.repeats, args.steps)
    print(f"\n| train step | ms | × {args.meshes[0]} |\n|---|---|---|")
    for name, row in train.items():
        print(f"| {name} | {row['ms']:.1f} | {row['ratio']:.2f} |")
    print("\n| Muon update (mesh=fsdp) | width | ms | × compiler |\n|---|---|---|---|")
    for width, rows in muon.items():
        for name, row in rows.items():
            print(f"| {name} | {width} | {row['ms']:.1f} | {row['ratio']:.2f} |")
    result = {"command": shlex.join(["python", *sys.argv]), "devices": jax.device_count(),
              "platform": jax.devices()[0].platform, "train_step": train,
              "muon_update": {str(w): rows for w, rows in muon.items()}}
    if args.out is not None:
        write_json_atomic(args.out, result)
    return result


if __name__ == "__main__":
    main()
