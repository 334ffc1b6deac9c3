"""Optimizer-step time of our Muon against the peer `optax.contrib.muon`, with orthogonality error.

    python benchmarks/muon_step.py --widths 256 1024 --depth 8 --repeats 5 --out muon_step.json

The tree is the default Transformer's (μP, base width 64, head_dim 32, 256-byte vocabulary).
Hidden matrices go to Muon, every other role to Adam, on both sides; optax gets the stack axis
as a batch axis through its dimension numbers. Rows:

- `optax`: optax.contrib.muon, Jordan coefficients × 5 steps, Frobenius normalization (the peer);
- `same`: ours with the same math (jordan × 5, frobenius, direct iteration, bias-corrected
  Nesterov momentum as optax does), so any gain is from batching same-shape matrices;
- `default`: ours at configs/optim/optim=muon (polar_express × 5, schatten4, ns_method auto:
  the Gram iteration for the aspect-4 MLP matrices);
- `direct` / `gram`: the default with ns_method forced to direct / gram.

A row's time is one jitted update (`tx.update` + `optax.apply_updates` on the whole tree, random
normal gradients, constant LR, no clipping or weight decay), after a warm-up call; its ratio is
the median over repeats of (row / optax) in the same repeat. The programs run interleaved
(A, B, A, B, ...) because the machine is shared. The orthogonality error is max_i |σ_i(O) − 1| of
the row's orthogonalization on U diag(σ) Vᵀ inputs of the benchmark's shapes (D × D, D × 4D),
σ log-spaced over [0.1, 1] and over [1e-3, 1], the worse of the two shapes. The train step is
one jitted forward + backward + update of `scaling.steps.backprop.make_train_step` on a batch of random
bytes, for the peer and for our default; opt/train is the optimizer step's share of it.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import os
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from optax.contrib._muon import orthogonalize_via_newton_schulz  # not re-exported by contrib

from models import label_tree
from optim import MuonConfig
from optim.orthogonalize import JORDAN, orthogonalize
from optim.role_transforms import ns_compute_dtype
from scaling.config import ModelConfig, ParamConfig
from scaling.files import write_json_atomic
from scaling.parametrization import build_model, build_optimizer
from scaling.steps.backprop import Measure, init_train_state, make_train_step, optimizer_at

VOCAB = 256  # bytes
SPECTRA = (0.1, 1e-3)  # smallest singular value of the orthogonality-error inputs
# name -> (label, overrides of the optim=muon config); None marks the optax peer.
ROWS: dict[str, tuple[str, dict | None]] = {
    "optax": ("optax.contrib.muon jordan×5 frobenius", None),
    "same": ("ours jordan×5 frobenius direct", {
        "ns_scheme": "jordan", "ns_steps": 5, "ns_normalization": "frobenius",
        "ns_method": "direct", "bias_correction": True}),
    "default": ("ours optim=muon: polar_express×5 schatten4 auto", {}),
    "direct": ("ours optim=muon, ns_method=direct", {"ns_method": "direct"}),
    "gram": ("ours optim=muon, ns_method=gram", {"ns_method": "gram"}),
}
TRAIN_ROWS = ("optax", "default")  # rows whose whole training step is timed too


def muon_default_config() -> MuonConfig:
    """`optim=muon`'s defaults with a constant LR and neither clipping nor weight decay: the peer
    has no clipping, and a schedule or decay would time something other than Muon."""
    return dataclasses.replace(MuonConfig(), schedule="constant", warmup_steps=0, clip_norm=0.0,
                               weight_decay=0.0)


def optax_muon(cfg: MuonConfig, labels, lr: float) -> optax.GradientTransformation:
    """The peer, configured like our row `same`: hidden by role → Muon with the stack axis as a
    batch axis (every axis but the last two), everything else → its AdamW."""
    dims = jax.tree.map(lambda role: optax.contrib.MuonDimensionNumbers(
        reduction_axis=-2, output_axis=-1) if role in cfg.matrix_roles else None, labels)
    return optax.contrib.muon(
        learning_rate=lr, ns_coeffs=JORDAN, ns_steps=5, beta=cfg.momentum, eps=cfg.eps,
        nesterov=cfg.nesterov, adam_b1=cfg.b1, adam_b2=cfg.b2,
        adam_learning_rate=dataclasses.replace(cfg, lr=lr).adam_base_lr(),
        muon_weight_dimension_numbers=dims)


def orthogonalizer(cfg: MuonConfig | None, peer_eps: float) -> Callable[[jax.Array], jax.Array]:
    """The orthogonalization a row's optimizer applies to one matrix (None: the peer's)."""
    if cfg is None:
        coefficients = jnp.asarray(JORDAN)
        return jax.jit(lambda g: orthogonalize_via_newton_schulz(
            g, coefficients, ns_steps=5, preconditioning="frobenius", eps=peer_eps))
    return jax.jit(lambda g: orthogonalize(
        g, scheme=cfg.ns_scheme, steps=cfg.ns_steps, normalization=cfg.ns_normalization,
        method=cfg.ns_method, compute_dtype=ns_compute_dtype(cfg.ns_dtype)))


def well_conditioned(key, m: int, n: int, smallest: float) -> jax.Array:
    """U diag(σ) Vᵀ with σ log-spaced over [smallest, 1] (tests/test_orthogonalize.py)."""
    k_u, k_v = jax.random.split(key)
    r = min(m, n)
    u_MxR = jnp.linalg.qr(jax.random.normal(k_u, (m, r)))[0]
    v_NxR = jnp.linalg.qr(jax.random.normal(k_v, (n, r)))[0]
    sigma_R = jnp.logspace(math.log10(smallest), 0, r)
    return (u_MxR * sigma_R) @ v_NxR.T


def orthogonality_errors(fn, inputs: dict[float, list[jax.Array]]) -> dict[float, float]:
    """max_i |σ_i(O) − 1|, the worse over the shapes, for each spectrum."""
    return {smallest: max(float(jnp.max(jnp.abs(
        jnp.linalg.svd(fn(g), compute_uv=False) - 1.0))) for g in gs)
        for smallest, gs in inputs.items()}


def dot_count(compiled) -> int:
    """Matrix products in the optimized HLO: a proxy for how many kernels the step launches."""
    return len(re.findall(r"\bdot\(", compiled.as_text()))


@dataclasses.dataclass
class Program:
    """A compiled step `carry, *extra -> carry` and its carry, advanced by every timed call."""

    compiled: Callable
    carry: object
    extra: tuple
    compile_s: float
    dots: int
    times: list[float] = dataclasses.field(default_factory=list)

    def run(self) -> None:
        started = time.perf_counter()
        self.carry = jax.block_until_ready(self.compiled(self.carry, *self.extra))
        self.times.append(time.perf_counter() - started)


def compile_program(step: Callable, carry, *extra) -> Program:
    """Compiles, then makes one warm-up call that is not timed."""
    started = time.perf_counter()
    compiled = step.lower(carry, *extra).compile()
    program = Program(compiled, carry, extra, time.perf_counter() - started, dot_count(compiled))
    program.run()
    program.times.clear()
    return program


def opt_step(tx: optax.GradientTransformation):
    def step(carry, grads):
        params, opt_state = carry
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return jax.jit(step, donate_argnums=0)  # donated like the train step's state


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)  # long runs: show where they are


def copy(tree):
    return jax.tree.map(jnp.copy, tree)  # each program owns (and donates) its own buffers


def bench_width(width: int, args, row_names: list[str]) -> list[dict]:
    model_cfg = ModelConfig(kind="transformer", width=width, depth=args.depth, head_dim=32)
    model, parametrization = build_model(model_cfg, ParamConfig("mup", 64), VOCAB, seed=0)
    graphdef, _ = nnx.split(model)
    params = nnx.state(model, nnx.Param).to_pure_dict()
    labels = label_tree(model)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    grads = treedef.unflatten([jax.random.normal(k, x.shape, x.dtype) * 1e-2
                               for k, x in zip(keys, leaves, strict=True)])
    tokens_Bx1T = jax.random.randint(jax.random.key(2), (args.batch_size, args.seq_len + 1),
                                     0, VOCAB)
    inputs_BxT, targets_BxT = tokens_Bx1T[:, :-1], tokens_Bx1T[:, 1:]
    base = muon_default_config()
    configs = {name: None if ROWS[name][1] is None else dataclasses.replace(base, **ROWS[name][1])
               for name in row_names}

    programs: dict[str, Program] = {}
    for name, cfg in configs.items():
        tx = (optax_muon(base, labels, base.lr) if cfg is None
              else build_optimizer(cfg, parametrization, total_steps=args.repeats + 1))
        programs[name] = compile_program(opt_step(tx), (copy(params), tx.init(params)), grads)
        progress(f"width {width}: {name} compiled and warmed up")
    for name in TRAIN_ROWS:
        if name not in configs:
            continue
        tx = ((lambda lr: optax_muon(base, labels, lr)) if configs[name] is None
              else optimizer_at(configs[name], parametrization, total_steps=args.repeats + 1))
        # both measure the same (the gradient norm; nothing is clipped) and carry the state
        step = make_train_step(graphdef, tx, Measure(parametrization.labels(), 0.0, False))
        programs[f"train:{name}"] = compile_program(
            jax.jit(lambda state, x, y, step=step: step(state, x, y)[0], donate_argnums=0),
            init_train_state(copy(params), tx, base.lr), inputs_BxT, targets_BxT)
        progress(f"width {width}: train:{name} compiled and warmed up")
    for repeat in range(args.repeats):
        for program in programs.values():
            program.run()
        progress(f"width {width}: repeat {repeat + 1}/{args.repeats}")

    matrix_shapes = [(width, width), (width, model_cfg.mlp_ratio * width)]
    inputs = {smallest: [well_conditioned(jax.random.key(3 + i), m, n, smallest)
                         for i, (m, n) in enumerate(matrix_shapes)] for smallest in SPECTRA}
    peer_times = programs[row_names[0]].times
    results = []
    for name, cfg in configs.items():
        program = programs[name]
        errors = orthogonality_errors(orthogonalizer(cfg, base.eps), inputs)
        train = programs.get(f"train:{name}")
        results.append({
            "width": width, "depth": args.depth, "row": name, "label": ROWS[name][0],
            "params": sum(x.size for x in leaves),
            "opt_step_ms": 1e3 * statistics.median(program.times),
            "opt_step_ms_all": [1e3 * t for t in program.times],
            "ratio_to_peer": statistics.median(
                t / p for t, p in zip(program.times, peer_times, strict=True)),
            "orth_error": {f"{smallest:g}": error for smallest, error in errors.items()},
            "dots": program.dots, "compile_s": program.compile_s,
            "train_step_ms": None if train is None else 1e3 * statistics.median(train.times),
            "opt_fraction_of_train": None if train is None else statistics.median(
                t / s for t, s in zip(program.times, train.times, strict=True)),
        })
    return results


def table(results: list[dict]) -> str:
    header = ("| width | optimizer | opt step ms | ours/optax | err σ∈[0.1,1] | err σ∈[1e-3,1] "
              "| dots | train step ms | opt/train |")
    lines = [header, "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        train = ("— | —" if r["train_step_ms"] is None
                 else f"{r['train_step_ms']:.1f} | {r['opt_fraction_of_train']:.2f}")
        lines.append(f"| {r['width']} | {r['label']} | {r['opt_step_ms']:.1f} | "
                     f"{r['ratio_to_peer']:.2f} | {r['orth_error']['0.1']:.3f} | "
                     f"{r['orth_error']['0.001']:.3f} | {r['dots']} | {train} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of each program")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS),
                        default=["optax", "same", "default", "direct"],
                        help="optax (the peer, always first) and our variants")
    parser.add_argument("--batch-size", type=int, default=8, help="train step: sequences")
    parser.add_argument("--seq-len", type=int, default=128, help="train step: bytes each")
    parser.add_argument("--out", type=Path, help="also write the results here as JSON")
    args = parser.parse_args()
    row_names = ["optax"] + [name for name in args.rows if name != "optax"]
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    machine = (f"jax {jax.__version__}, optax {optax.__version__}, devices {jax.devices()}, "
               f"{os.cpu_count()} CPUs")
    print(f"$ {command}\n{machine}\n", flush=True)
    started = time.perf_counter()
    results = []
    for width in args.widths:
        results += bench_width(width, args, row_names)
        print(table([r for r in results if r["width"] == width]) + "\n", flush=True)
        gc.collect()  # the previous width's programs and buffers
    wall_s = time.perf_counter() - started
    print(table(results))
    print(f"\n{args.repeats} interleaved repeats per program, medians; train step on "
          f"{args.batch_size}×{args.seq_len} random bytes; total {wall_s:.0f} s")
    if args.out:
        write_json_atomic(args.out, {"command": command, "machine": machine, "wall_s": wall_s,
                                     "batch_size": args.batch_size, "seq_len": args.seq_len,
                                     "repeats": args.repeats, "results": results})


if __name__ == "__main__":
    main()
