"""Peak memory of one MeZO step against one forward pass and one AdamW step, from the compiled
programs.

    python benchmarks/mezo_memory.py --out mezo_memory.json      # width 512, depths 2–32
    python benchmarks/mezo_memory.py --depths 8 --scan-unroll true --device-peak   # on a GPU

Programs, all on the default Transformer of `build_model` (μP, 256-byte vocabulary), as the
training loop runs them, on one run stacked on a leading axis: forward = the eval loss
(`next_token_loss`, vmapped as `make_eval` does); MeZO = `make_estimate` (the two perturbed
forwards, stacked weights perturbed layer by layer inside the scan) and `make_update`
(parameters donated, updated one layer at a time); AdamW = `make_train_step` with
`optimizer_at` (the framework's backprop step, state donated); naive MeZO = θ ± εz built for the
whole tree first, then the forward: the textbook way, for contrast (one unstacked run).

Each program is lowered on abstract arguments and compiled; `memory_analysis()` gives its
bytes. A program's peak is the backend's reported peak where that covers the temporaries, else
arguments + temporaries + outputs − aliased (a donated buffer is both an argument and an output;
the CPU backend reports a "peak" of about the arguments alone). MeZO's step peak is the larger
of its two programs' (both hold the parameters). `--device-peak` then runs forward, MeZO and
AdamW once each, in that order, on real arrays and reads the device's `peak_bytes_in_use` after
each: the counter only grows, so MeZO's reading bounds its ratio to the forward from above and
AdamW's bounds its ratio to MeZO from below.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.config import ModelConfig, compute_dtype
from optim import AdamWConfig
from optim.config import MeZOConfig
from optim.mezo import perturb, probe_key, projected_gradient, step_key
from scaling.config import ParamConfig
from scaling.files import write_json_atomic
from scaling.parametrization import build_model, make_parametrization
from scaling.steps.backprop import Measure, init_train_state, make_train_step, optimizer_at
from scaling.steps.loss import next_token_loss
from scaling.steps.state import TrainState
from scaling.steps.zeroth_order import init_zo_state, make_estimate, make_update, zo_setup

VOCAB = 256  # bytes
TOTAL_STEPS = 1000  # the schedules' horizon; it sets only the LR each step reads
# MeZO at inference memory, and far below a backprop step
TARGETS = {"mezo_over_forward_max": 1.25, "adamw_over_mezo_min": 4.0}
# what a run compiles (the tests also ask lowerables for "naive_forward")
PROGRAMS = ("forward", "mezo_estimate", "mezo_update", "adamw", "naive_mezo")


def naive_estimate(graphdef, setup, signs=(1, -1)):
    """The projected gradient with θ ± εz materialized for the whole tree before each forward;
    with signs=(1,), the loss at θ + εz alone (the same tree-wide copy, half the compile)."""
    eps = setup.cfg.eps

    def estimate(params, opt_state, inputs_BxT, targets_BxT):
        key = probe_key(step_key(setup.seed, opt_state.count), 0)

        def loss_at(scale):
            perturbed = perturb(params, setup.plan, opt_state.thresholds, key, scale)
            return next_token_loss(graphdef, perturbed, inputs_BxT, targets_BxT)

        losses = [loss_at(sign * eps) for sign in signs]
        return losses[0] if len(losses) == 1 else projected_gradient(*losses, eps)

    return jax.jit(estimate)


def model_config(width: int, depth: int, scan_unroll) -> ModelConfig:
    return ModelConfig(width=width, depth=depth, scan_unroll=scan_unroll)


def lowerables(cfg: ModelConfig, seq_len: int, batch_size: int) -> dict:
    """name -> (jitted program, its abstract arguments)."""
    par = make_parametrization(cfg, ParamConfig(), VOCAB)
    model = nnx.eval_shape(lambda: build_model(cfg, ParamConfig(), VOCAB, seed=0)[0])
    graphdef = nnx.graphdef(model)
    params = nnx.state(model, nnx.Param).to_pure_dict()
    tokens_BxT = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32)
    setup = zo_setup(MeZOConfig(), par, total_steps=TOTAL_STEPS, seed=0)
    tx = optimizer_at(AdamWConfig(), par, total_steps=TOTAL_STEPS)
    one = jax.eval_shape(lambda p: init_zo_state(p, setup, 1e-3), params)
    zo = jax.eval_shape(lambda p: TrainState.stack([init_zo_state(p, setup, 1e-3)]), params)
    adamw = jax.eval_shape(lambda p: TrainState.stack([init_train_state(p, tx, 1e-3)]), params)
    o = zo.opt_state
    forward = jax.jit(jax.vmap(lambda p, x, y: next_token_loss(graphdef, p, x, y),
                               in_axes=(0, None, None)))
    measure = Measure(par.labels(), AdamWConfig().clip_norm)
    return {
        "forward": (forward, (zo.params, tokens_BxT, tokens_BxT)),
        "mezo_estimate": (make_estimate(graphdef, setup, runs=1),
                          (zo.params, o, zo.lr, tokens_BxT, tokens_BxT)),
        "mezo_update": (make_update(setup, runs=1),
                        (zo.params, o.count, o.thresholds, o.g, o.lr_used)),
        "adamw": (make_train_step(graphdef, tx, measure, runs=1),
                  (adamw, tokens_BxT, tokens_BxT)),
        "naive_mezo": (naive_estimate(graphdef, setup),
                       (one.params, one.opt_state, tokens_BxT, tokens_BxT)),
        "naive_forward": (naive_estimate(graphdef, setup, signs=(1,)),
                          (one.params, one.opt_state, tokens_BxT, tokens_BxT)),
    }


def program_memory(compiled) -> dict:
    s = compiled.memory_analysis()
    m = {"arguments": int(s.argument_size_in_bytes), "temporaries": int(s.temp_size_in_bytes),
         "outputs": int(s.output_size_in_bytes), "aliased": int(s.alias_size_in_bytes),
         "reported_peak": int(getattr(s, "peak_memory_in_bytes", 0) or 0)}
    m["summed"] = m["arguments"] + m["temporaries"] + m["outputs"] - m["aliased"]
    return m


def with_peaks(memory: dict) -> tuple[dict, str]:
    """Each program's peak by one rule for all: the reported peak only if it covers every
    program's temporaries (it does not on CPU), else the sum less aliased bytes."""
    trusted = all(m["reported_peak"] >= max(m["temporaries"], 1) for m in memory.values())
    for m in memory.values():
        m["peak"] = m["reported_peak"] if trusted else m["summed"]
    return memory, "reported" if trusted else "summed"


def measure_shape(cfg: ModelConfig, seq_len: int, batch_size: int,
                  programs=PROGRAMS) -> tuple[dict, dict]:
    """(the shape's row of the results, name -> compiled program)."""
    memory, compile_s, compiled = {}, {}, {}
    todo = lowerables(cfg, seq_len, batch_size)
    for name in programs:
        jitted, args = todo[name]
        started = time.perf_counter()
        compiled[name] = jitted.lower(*args).compile()
        compile_s[name] = time.perf_counter() - started
        memory[name] = program_memory(compiled[name])
    memory, source = with_peaks(memory)
    params = todo["naive_forward"][1][0]  # one run's parameters
    row = {"scan_unroll": unroll_name(cfg.scan_unroll), "depth": cfg.depth, "width": cfg.width,
           "param_bytes": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)),
           "layer_param_bytes": layer_param_bytes(cfg), "peak_source": source,
           "programs": memory, "compile_s": compile_s}
    peaks = {name: m["peak"] for name, m in memory.items()}
    if {"mezo_estimate", "mezo_update"} <= peaks.keys():  # both hold the parameters
        peaks["mezo"] = max(peaks.pop("mezo_estimate"), peaks.pop("mezo_update"))
    row["peaks"] = peaks
    if {"forward", "mezo", "adamw"} <= peaks.keys():
        row["mezo_over_forward"] = peaks["mezo"] / peaks["forward"]
        row["adamw_over_mezo"] = peaks["adamw"] / peaks["mezo"]
        row["targets_met"] = (row["mezo_over_forward"] <= TARGETS["mezo_over_forward_max"]
                              and row["adamw_over_mezo"] >= TARGETS["adamw_over_mezo_min"])
    return row, compiled


def layer_param_bytes(cfg: ModelConfig) -> int:
    """One block's float32 parameters: 4 D×D attention, 2 D×F MLP matrices, 2 gains."""
    D, F = cfg.width, cfg.mlp_ratio * cfg.width
    return 4 * (4 * D * D + 2 * D * F + 2 * D)


# ---------------------------------------------------------------- the device's own counter


def device_peak(cfg: ModelConfig, seq_len: int, batch_size: int, compiled: dict,
                stats=None) -> dict:
    """The device's peak_bytes_in_use after forward, then MeZO, then AdamW, each run once.

    One parameter tree is passed along (MeZO's update donates it; AdamW's state is built from
    what the update returns), so each reading holds only what its program needs. Where the
    backend keeps no counter (CPU) the programs still run and the readings are None.
    """
    stats = stats or jax.devices()[0].memory_stats
    reading = lambda key: (stats() or {}).get(key)
    model, par = build_model(cfg, ParamConfig(), VOCAB, seed=0)
    params = nnx.state(model, nnx.Param).to_pure_dict()
    del model
    setup = zo_setup(MeZOConfig(), par, total_steps=TOTAL_STEPS, seed=0)
    tokens_BxT = jnp.zeros((batch_size, seq_len), jnp.int32)
    zo = TrainState.stack([init_zo_state(params, setup, 1e-3)])
    del params  # zo.params holds them, stacked
    params, o, lr = zo.params, jax.block_until_ready(zo.opt_state), zo.lr
    del zo
    peak_before = reading("peak_bytes_in_use")
    bytes_ = {"in_use_before": reading("bytes_in_use")}
    jax.block_until_ready(compiled["forward"](params, tokens_BxT, tokens_BxT))
    bytes_["forward"] = reading("peak_bytes_in_use")
    gs, lr_used, *_ = compiled["mezo_estimate"](params, o, lr, tokens_BxT, tokens_BxT)
    params = compiled["mezo_update"](params, o.count, o.thresholds, gs, lr_used)
    jax.block_until_ready(params)
    bytes_["mezo"] = reading("peak_bytes_in_use")
    del o
    tx = optimizer_at(AdamWConfig(), par, total_steps=TOTAL_STEPS)
    state = TrainState.stack([init_train_state(jax.tree.map(lambda x: x[0], params), tx, 1e-3)])
    del params
    jax.block_until_ready(compiled["adamw"](state, tokens_BxT, tokens_BxT))
    bytes_["adamw"] = reading("peak_bytes_in_use")
    if peak_before is None:
        return {"bytes": None, "note": "the backend keeps no peak_bytes_in_use counter"}
    return {"bytes": bytes_, "peak_before": peak_before,
            # nothing earlier in the process (an autotuner, another measurement) peaked higher
            "clean_start": peak_before <= bytes_["forward"],
            "mezo_over_forward_at_most": bytes_["mezo"] / bytes_["forward"],
            "adamw_over_mezo_at_least": bytes_["adamw"] / bytes_["mezo"]}


# ---------------------------------------------------------------- command line


def unroll_arg(value: str) -> int | bool:
    text = value.strip().lower()
    if text in ("true", "false"):
        return text == "true"
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise argparse.ArgumentTypeError(f"{value!r}: expected a positive integer, true or false")


def unroll_name(unroll) -> str:
    return str(unroll).lower()


def mb(n: int) -> str:
    return f"{n / 1e6:,.1f}"


def tables(result: dict) -> str:
    lines = [("| scan_unroll | depth | forward MB | MeZO MB (estimate / update) | AdamW MB | "
              "naive MeZO MB | MeZO/forward | AdamW/MeZO |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        p, m = r["peaks"], r["programs"]
        naive = mb(p["naive_mezo"]) if "naive_mezo" in p else "—"
        lines.append(f"| {r['scan_unroll']} | {r['depth']} | {mb(p['forward'])} | {mb(p['mezo'])}"
                     f" ({mb(m['mezo_estimate']['peak'])} / {mb(m['mezo_update']['peak'])}) | "
                     f"{mb(p['adamw'])} | {naive} | {r['mezo_over_forward']:.2f} | "
                     f"{r['adamw_over_mezo']:.1f} |")
    lines += ["", "temporaries (MB) by depth:",
              ("| scan_unroll | depth | one layer's params | forward | MeZO estimate | "
               "MeZO update | AdamW | naive MeZO |"), "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        t = {name: mb(m["temporaries"]) for name, m in r["programs"].items()}
        lines.append(f"| {r['scan_unroll']} | {r['depth']} | {mb(r['layer_param_bytes'])} | "
                     + " | ".join(t.get(name, "—") for name in PROGRAMS) + " |")
    d = result.get("device_peak")
    if d and d["bytes"]:
        b = d["bytes"]
        lines.append(f"\ndevice peak_bytes_in_use after forward {mb(b['forward'])}, MeZO "
                     f"{mb(b['mezo'])}, AdamW {mb(b['adamw'])} MB: MeZO/forward ≤ "
                     f"{d['mezo_over_forward_at_most']:.2f}, AdamW/MeZO ≥ "
                     f"{d['adamw_over_mezo_at_least']:.1f}"
                     + ("" if d["clean_start"] else " (NOT a clean start)"))
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--depths", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--scan-unroll", type=unroll_arg, nargs="+", default=[True, 1],
                   metavar="{K,true,false}", help="model.scan_unroll values to measure")
    p.add_argument("--naive-max-depth", type=int, default=32,
                   help="compile the naive program only up to this depth (its compile is slow)")
    p.add_argument("--device-peak", action="store_true",
                   help="also run each program once at the largest depth and first scan_unroll "
                        "and read the device's peak_bytes_in_use (GPU/TPU)")
    p.add_argument("--out", type=Path, help="also write the results here as JSON")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    for name in ("width", "seq_len", "batch_size"):
        if getattr(args, name) < 1:
            parser().error(f"--{name.replace('_', '-')}: expected a positive integer")
    if min(args.depths) < 1:
        parser().error(f"--depths {args.depths}: expected positive integers")
    command = shlex.join([Path(sys.executable).name, "benchmarks/mezo_memory.py",
                          *(sys.argv[1:] if argv is None else argv)])
    device = jax.devices()[0]
    machine = (f"jax {jax.__version__}, {device.device_kind} ({device.platform}), "
               f"{os.cpu_count()} CPUs")
    print(f"$ {command}\n{machine}", flush=True)
    rows, device_programs = [], None
    for unroll in args.scan_unroll:
        for depth in args.depths:
            programs = [p for p in PROGRAMS if p != "naive_mezo" or depth <= args.naive_max_depth]
            row, compiled = measure_shape(model_config(args.width, depth, unroll), args.seq_len,
                                          args.batch_size, programs)
            rows.append(row)
            if device_programs is None and depth == max(args.depths):
                device_programs = compiled  # the first scan_unroll's, at the largest depth
            print(f"scan_unroll {unroll_name(unroll)}, depth {depth}: compiled in "
                  f"{sum(rows[-1]['compile_s'].values()):.1f} s", file=sys.stderr, flush=True)
    result = {"command": command, "machine": machine,
              "config": {"width": args.width, "depths": args.depths, "seq_len": args.seq_len,
                         "batch_size": args.batch_size, "vocab": VOCAB,
                         "scan_unroll": [unroll_name(u) for u in args.scan_unroll],
                         "compute_dtype": np.dtype(compute_dtype("auto")).name},
              "targets": TARGETS, "rows": rows, "device_peak": None}
    if args.device_peak:
        cfg = model_config(args.width, max(args.depths), args.scan_unroll[0])
        result["device_peak"] = device_peak(cfg, args.seq_len, args.batch_size,
                                            device_programs)
    print(tables(result), flush=True)
    if args.out:
        write_json_atomic(args.out, result)
    return result


if __name__ == "__main__":
    main()
