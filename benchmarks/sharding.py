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
    parser.add_argument("overrides", nargs="*",
                        help="scaling-train overrides of the model (key=value; see run_config)")
    return parser.parse_args()


if __name__ == "__main__" and "device_count" not in os.environ.get("XLA_FLAGS", ""):
    # before JAX starts; imported (benchmarks/gpu_suite.py), the devices are the real ones
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={_parse().devices}")

import jax
import numpy as np
import optax

from scaling.config import RunConfig, from_dict
from scaling.files import write_json_atomic
from scaling.sharding import place
from scaling.steps import make_step
from scaling.steps.backprop import optimizer_at
from scaling.training import data
from scaling.training.loop import model_on_mesh

VOCAB = 256


# `mesh=<option>`: scaling-train's configs/mesh/<option>.yaml, over RunConfig's MeshConfig
MESHES = {"single": {}, "data": {"data": -1}, "fsdp": {"fsdp": -1},
          "fsdp_tp": {"fsdp": -1, "tensor": 2}}


def _value(text: str):
    """An override's value as YAML would read it: null, true/false, a number, else the text."""
    lowered = text.strip().lower()
    if lowered in ("null", "none", "~"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def run_config(overrides: list[str]) -> RunConfig:
    """The run `overrides` describe, from the library's dataclasses (no Hydra: the GPU image
    has none): scaling-train's defaults (RunConfig()), then the group choices `optim=<name>`
    (that optimizer at its defaults) and `mesh=<option>` (MESHES), then field overrides
    `group.field=value` (e.g. model.width=32, optim.ns_sharding=stack), in that order as
    Hydra applies them. The same RunConfig scaling-train composes from these overrides
    (tests/test_gpu_script.py checks)."""
    values: dict = {}
    fields = []
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep:
            raise SystemExit(f"sharding.py: override {override!r}: expected key=value")
        if key == "optim":
            values["optim"] = {"name": text}
        elif key == "mesh":
            if text not in MESHES:
                raise SystemExit(f"sharding.py: mesh={text}: expected one of {list(MESHES)}")
            values["mesh"] = dict(MESHES[text])
        elif "." in key:
            fields.append((key.split("."), _value(text)))
        else:
            raise SystemExit(f"sharding.py: override {override!r}: expected optim=<name>, "
                             f"mesh=<option> or <group>.<field>=<value>")
    for path, value in fields:
        node = values
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return from_dict(values)


def train_program(cfg: RunConfig):
    """(step, state, batch) of the run `cfg`, placed on its mesh: the training loop's backprop
    step of one unstacked run, without the indicators (the gradient norm and clip factor it
    always measures are discarded)."""
    run = model_on_mesh(cfg, VOCAB)
    layout, t = run.layout, cfg.train
    stack = None if layout is None else layout.stack

    def step_of(shardings=None):
        return make_step(cfg.optim, run.parametrization, run.graphdef, total_steps=t.steps,
                         indicators=False, shardings=shardings, stack=stack, seed=t.seed)

    state = step_of().init_state(run.params, cfg.optim.lr)
    shardings = None if layout is None else layout.state(state, run.parametrization.specs)
    step = step_of(shardings)
    tokens = np.random.default_rng(0).integers(0, VOCAB, 1 << 16).astype(np.uint16)
    batch = data.train_batch(tokens, 0, 0, t.batch_size, t.seq_len)
    if layout is not None:
        state, batch = place(state, shardings), place(batch, (layout.batch,) * 2)
    return step, state, batch


def muon_program(cfg: RunConfig):
    """(update, state) of Muon's step alone: tx.update + apply on fixed random gradients."""
    run = model_on_mesh(cfg, VOCAB)
    params, parametrization, layout = run.params, run.parametrization, run.layout
    tx = optimizer_at(cfg.optim, parametrization, total_steps=cfg.train.steps,
                      stack=layout.stack)(cfg.optim.lr)
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


def train_overrides(model: list[str], mesh: str) -> list[str]:
    return [*model, f"mesh={mesh}"]


def muon_overrides(model: list[str], width: int, kind: str) -> list[str]:
    return ["optim=muon", "optim.clip_norm=0", *model, f"model.width={width}", "mesh=fsdp",
            f"optim.ns_sharding={kind}"]


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
        step, state, batch = train_program(run_config(train_overrides(model, mesh)))
        steps[mesh] = (lambda s, step=step, batch=batch: step(s, *batch)[0], state)
    train = compare(steps, args.meshes[0], args.repeats, args.steps)
    muon = {}
    for width in args.widths:
        rows = {kind: muon_program(run_config(muon_overrides(model, width, kind)))
                for kind in ("stack", "compiler")}
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
