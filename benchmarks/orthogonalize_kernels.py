"""Pallas against XLA on the same direct Newton–Schulz: time, roofline fraction and agreement.

    python benchmarks/orthogonalize_kernels.py --shapes 1024x1024 4096x4096 4096x14336 --out ns.json

Both backends run the direct iteration with the same coefficients, steps and normalization on
float32 (batch, m, n) random normal inputs, matmul operands in --dtype, accumulated in float32:
`optim.orthogonalize.newton_schulz` (XLA) and `optim.kernels.pallas_newton_schulz` (Pallas, the
kernel --kernel picks; the table names the one that ran). Each is jitted and compiled (compile
time reported), called once to warm up, then timed --repeats times interleaved (xla, pallas,
xla, ...) because the machine may be shared; times are medians, and the speedup is the median
over repeats of xla/pallas in the same repeat (> 1: Pallas is faster).

FLOPs per call are batch · steps · (4m²n + 2m³), m the short side and n the long one (the tiled
kernel does fewer, so its rate is an effective one). The roofline fraction divides that rate by
the measured rate of a jitted s × s bfloat16 matmul (s = --peak-size, 2s³ FLOPs, float32
accumulation), and by the device kind's nominal dense bf16 peak where it is known.
Agreement: max |P − X| and ‖P − X‖_F / ‖X‖_F between the outputs, and max_i |σ_i(P) − 1| of the
first Pallas matrix in float32 (skipped above 4096² elements).

Targets (the issue, on a GPU): ≥ 1.2× over XLA at 4096x4096, and ≥ 60% of roofline for m ≥ 1024.
On CPU the kernels run only in the Pallas interpreter, so this refuses to time them unless given
--allow-interpret, for a correctness run on small shapes:

    python benchmarks/orthogonalize_kernels.py --allow-interpret --shapes 96x96 64x200 --repeats 1
"""

from __future__ import annotations

import argparse
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from peaks import NOMINAL_BF16_PEAKS, nominal_peak

from optim.kernels import KERNELS, pallas_newton_schulz
from optim.kernels.compat import platform
from optim.kernels.ns_math import NORMALIZATIONS
from optim.orthogonalize import PRESET_NAMES, newton_schulz, preset
from scaling.files import write_json_atomic

EPS = 1e-7
SVD_MAX_ELEMENTS = 4096 * 4096  # larger matrices skip the orthogonality error
SPEEDUP_TARGET, ROOFLINE_TARGET, ROOFLINE_MIN_SIDE = 1.2, 0.6, 1024
INTERPRET_LABEL = "interpret mode (CPU): times are not kernel performance"
def shape_arg(value: str) -> tuple[int, int]:
    match = re.fullmatch(r"([1-9][0-9]*)[xX]([1-9][0-9]*)", value.strip())
    if match is None:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a shape: expected MxN with positive integers, e.g. 4096x14336")
    return int(match[1]), int(match[2])


def positive(value: str) -> int:
    if not re.fullmatch(r"[1-9][0-9]*", value.strip()):
        raise argparse.ArgumentTypeError(f"{value!r}: expected a positive integer")
    return int(value)


def compile_and_warm(fn, *args):
    """(compiled fn, compile seconds, output of the untimed warm-up call)."""
    started = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - started
    return compiled, compile_s, jax.block_until_ready(compiled(*args))


def call_seconds(compiled, *args) -> float:
    started = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    return time.perf_counter() - started


def measured_peak(size: int, repeats: int) -> float:
    """FLOP/s of a jitted size × size bfloat16 matmul with float32 accumulation."""
    k_a, k_b = jax.random.split(jax.random.key(1))
    a_SxS = jax.random.normal(k_a, (size, size), jnp.bfloat16)
    b_SxS = jax.random.normal(k_b, (size, size), jnp.bfloat16)
    compiled, _, _ = compile_and_warm(
        lambda p, q: jnp.matmul(p, q, preferred_element_type=jnp.float32), a_SxS, b_SxS)
    seconds = statistics.median(call_seconds(compiled, a_SxS, b_SxS) for _ in range(repeats))
    return 2 * size**3 / seconds


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def bench_shape(m: int, n: int, args, peak: float, nominal: float | None) -> dict:
    coefficients, safety = preset(args.scheme, args.steps)
    common = {"safety": safety, "eps": EPS, "compute_dtype": jnp.dtype(args.dtype),
              "normalization": args.normalization}
    fns = {"xla": lambda g: newton_schulz(g, coefficients, **common),
           "pallas": lambda g: pallas_newton_schulz(g, coefficients, method="direct",
                                                    kernel=args.kernel, tile=args.tile, **common)}
    x_BxMxN = jax.random.normal(jax.random.key(0), (args.batch, m, n), jnp.float32)
    jaxpr = str(jax.make_jaxpr(fns["pallas"])(x_BxMxN))
    kernel = ("fused" if "fused_newton_schulz" in jaxpr
              else "tiled" if "symmetric_gram" in jaxpr else "?")
    compiled, compile_s, outs, times = {}, {}, {}, {name: [] for name in fns}
    for name, fn in fns.items():
        compiled[name], compile_s[name], outs[name] = compile_and_warm(fn, x_BxMxN)
        progress(f"{m}x{n}: {name} compiled in {compile_s[name]:.1f} s and warmed up")
    for _ in range(args.repeats):
        for name in fns:
            times[name].append(call_seconds(compiled[name], x_BxMxN))
    short, long = sorted((m, n))
    flops = args.batch * len(coefficients) * (4 * short * short * long + 2 * short**3)
    rate = flops / statistics.median(times["pallas"])
    pallas, xla = outs["pallas"], outs["xla"]
    orth = None
    if m * n <= SVD_MAX_ELEMENTS:
        sigma = jnp.linalg.svd(pallas[0].astype(jnp.float32), compute_uv=False)
        orth = float(jnp.max(jnp.abs(sigma - 1.0)))
    return {
        "shape": f"{m}x{n}", "m": m, "n": n, "batch": args.batch, "kernel": kernel,
        "compile_s_xla": compile_s["xla"], "compile_s_pallas": compile_s["pallas"],
        "xla_ms": 1e3 * statistics.median(times["xla"]),
        "pallas_ms": 1e3 * statistics.median(times["pallas"]),
        "xla_ms_all": [1e3 * t for t in times["xla"]],
        "pallas_ms_all": [1e3 * t for t in times["pallas"]],
        "speedup": statistics.median(
            x / p for x, p in zip(times["xla"], times["pallas"], strict=True)),
        "flops": flops, "tflops_pallas": rate / 1e12,
        "roofline_measured": rate / peak,
        "roofline_nominal": None if nominal is None else rate / nominal,
        "max_abs_diff": float(jnp.max(jnp.abs(pallas - xla))),
        "rel_diff": float(jnp.linalg.norm((pallas - xla).ravel()) / jnp.linalg.norm(xla.ravel())),
        "orth_err": orth,
    }


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    header = ("| shape | batch | kernel | compile xla s | compile pallas s | xla ms | pallas ms "
              "| speedup | TFLOP/s pallas | roofline (measured) | roofline (nominal) | max \\|Δ\\| "
              "| rel Δ | orth err |")
    lines = [header, "|---|---:|---|" + "---:|" * 11]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['batch']} | {r['kernel']} | {r['compile_s_xla']:.2f} "
            f"| {r['compile_s_pallas']:.2f} | {r['xla_ms']:.3f} | {r['pallas_ms']:.3f} "
            f"| {r['speedup']:.2f} | {r['tflops_pallas']:.4g} | {r['roofline_measured']:.1%} "
            f"| {fmt(r['roofline_nominal'], '.1%')} | {r['max_abs_diff']:.2e} "
            f"| {r['rel_diff']:.2e} | {fmt(r['orth_err'], '.3f')} |")
    return "\n".join(lines)


def verdicts(rows: list[dict]) -> list[str]:
    def met(ok: bool) -> str:
        return "met" if ok else "NOT met"

    at_4096 = [r for r in rows if (r["m"], r["n"]) == (4096, 4096)]
    lines = [f"speedup ≥ {SPEEDUP_TARGET}× at 4096x4096: " + (
        f"{at_4096[0]['speedup']:.2f}× → {met(at_4096[0]['speedup'] >= SPEEDUP_TARGET)}"
        if at_4096 else "not measured (4096x4096 not in --shapes)")]
    for r in rows:
        if min(r["m"], r["n"]) < ROOFLINE_MIN_SIDE:
            continue
        for which in ("measured", "nominal"):
            value = r[f"roofline_{which}"]
            if value is not None:
                lines.append(f"roofline ≥ {ROOFLINE_TARGET:.0%} ({which} peak) at {r['shape']}: "
                             f"{value:.1%} → {met(value >= ROOFLINE_TARGET)}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", type=shape_arg, nargs="+", metavar="MxN",
                        default=[(1024, 1024), (4096, 4096), (4096, 14336)])
    parser.add_argument("--batch", type=positive, default=1, help="matrices per call")
    parser.add_argument("--scheme", choices=PRESET_NAMES, default="polar_express")
    parser.add_argument("--steps", type=positive, default=5)
    parser.add_argument("--normalization", choices=NORMALIZATIONS, default="frobenius")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                        help="matmul operand dtype of both backends (float32 accumulation)")
    parser.add_argument("--kernel", choices=KERNELS, default="auto")
    parser.add_argument("--tile", type=positive, help="tiled-kernel tile (default: the platform's)")
    parser.add_argument("--repeats", type=positive, default=5, help="timed calls of each backend")
    parser.add_argument("--peak-size", type=positive,
                        help="side of the bf16 matmul timed for the peak (default 8192; 1024 "
                             "on CPU)")
    parser.add_argument("--out", type=Path, help="also write the results here as JSON")
    parser.add_argument("--allow-interpret", action="store_true",
                        help="on CPU, run the interpreted kernels anyway (correctness only)")
    args = parser.parse_args()
    interpreted = platform() == "cpu"
    if interpreted and not args.allow_interpret:
        parser.exit(2, "orthogonalize_kernels: on CPU the Pallas kernels only run in the "
                       "interpreter, so their times are meaningless; pass --allow-interpret with "
                       "small shapes (e.g. --shapes 96x96 64x200 --repeats 1) for a correctness "
                       "run\n")
    device = jax.devices()[0]
    command = shlex.join(sys.argv)
    print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}\n"
          f"$ {command}" + (f"\n{INTERPRET_LABEL}" if interpreted else "") + "\n", flush=True)
    print("| nominal dense bf16 peak | TFLOP/s |\n|---|---:|")
    print("\n".join(f"| {label} | {peak / 1e12:.0f} |" for label, _, peak in NOMINAL_BF16_PEAKS))
    nominal = nominal_peak(device.device_kind)
    peak_size = args.peak_size or (1024 if interpreted else 8192)
    peak = measured_peak(peak_size, max(args.repeats, 5))
    print(f"\nmeasured peak: {peak / 1e12:.4g} TFLOP/s ({peak_size}² bf16 matmul, f32 accumulate)"
          f"; nominal: " + (f"{nominal[1] / 1e12:.0f} TFLOP/s ({nominal[0]})" if nominal
                            else f"unknown for {device.device_kind!r}") + "\n", flush=True)
    rows = [bench_shape(m, n, args, peak, nominal and nominal[1]) for m, n in args.shapes]
    print(table(rows))
    print(f"\n{args.scheme}×{args.steps} {args.normalization}, {args.dtype} operands, "
          f"{args.repeats} interleaved repeats, medians")
    if interpreted:
        print(f"{INTERPRET_LABEL}; targets not judged")
    else:
        print("\n".join(["", "targets:"] + verdicts(rows)))
    if args.out:
        write_json_atomic(args.out, {
            "device": device.device_kind, "platform": device.platform,
            "jax": jax.__version__, "command": command, "interpreted": interpreted,
            "peak": {"measured_flops": peak, "size": peak_size,
                     "nominal_flops": nominal and nominal[1],
                     "nominal_kind": nominal and nominal[0]},
            "scheme": args.scheme, "steps": args.steps, "normalization": args.normalization,
            "dtype": args.dtype, "repeats": args.repeats, "rows": rows})


if __name__ == "__main__":
    main()
