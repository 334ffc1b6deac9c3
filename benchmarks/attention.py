"""Causal attention through `jax.nn.dot_product_attention`: cuDNN's fused kernel against XLA's.

    python benchmarks/attention.py --out attention.json       # the MFU shape, on a GPU
    python benchmarks/attention.py --batch-size 2 --seq-len 16 --width 64   # tiny, on CPU

The attention of the train step's MFU run (benchmarks/gpu_suite.py MFU_SHAPE: width 2048 in
heads of model.head_dim = 32, sequence 1024, batch 16) on random bf16 q, k, v, at the attention
scale μP gives that shape (what `models.layers.causal_attention` is called with). For each of
implementation="xla" (materializes the T × T scores) and implementation="cudnn" (fused; only on
an NVIDIA GPU with 16-bit operands): the forward pass, and the forward and backward pass (the
gradients of Σ out · dout for a fixed random dout, with respect to q, k and v), each compiled
once, called once to warm up, then timed as the median over --repeats of --calls calls.

Agreement: max |out_cudnn − out_xla| / RMS(out_xla), and the same for each gradient (relative to
that gradient's RMS); for scale, each implementation's gap to float32 XLA attention on the same
inputs (the bf16 floor). Where cuDNN's attention is not available (jax raises while tracing,
compiling or running it) the result records "cudnn unavailable: <error>" and the XLA side alone;
on a platform other than a GPU it is not tried ("cudnn skipped: ...").
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from models.config import ModelConfig
from scaling.config import ParamConfig
from scaling.files import write_json_atomic
from scaling.parametrization import make_parametrization

VOCAB = 256  # bytes, as the MFU run's model
GRADS = ("dq", "dk", "dv")


def attention_scale(width: int, head_dim: int) -> float:
    """The scale μP (scaling-train's default) gives the attention logits at this shape."""
    return make_parametrization(ModelConfig(width=width, head_dim=head_dim), ParamConfig(),
                                VOCAB).attention_scale


def programs(implementation: str, scale: float) -> dict:
    """name -> jitted (q, k, v, dout) -> output (forward) or (dq, dk, dv) (forward_backward)."""
    def attend(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                            implementation=implementation)

    def forward(q, k, v, dout):
        del dout
        return attend(q, k, v)

    def forward_backward(q, k, v, dout):
        loss = lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32)
                                       * dout.astype(jnp.float32))
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    return {"forward": jax.jit(forward), "forward_backward": jax.jit(forward_backward)}


def measure(implementation: str, scale: float, inputs: tuple, repeats: int, calls: int
            ) -> tuple[dict, dict]:
    """({name: ms, compile_s}, {name: its outputs, on the device}) of one implementation."""
    timings, outputs, compile_s = {}, {}, {}
    for name, jitted in programs(implementation, scale).items():
        started = time.perf_counter()
        compiled = jitted.lower(*inputs).compile()
        compile_s[name] = time.perf_counter() - started
        outputs[name] = jax.block_until_ready(compiled(*inputs))  # warm-up; also compared
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            for _ in range(calls):
                result = compiled(*inputs)
            jax.block_until_ready(result)
            seconds.append((time.perf_counter() - started) / calls)
        timings[f"{name}_ms"] = 1e3 * statistics.median(seconds)
    return {**timings, "compile_s": compile_s}, outputs


def reference(scale: float, inputs: tuple) -> dict:
    """Float32 XLA attention on the same (bf16-rounded) inputs: the floor bf16 is held to."""
    upcast = tuple(x.astype(jnp.float32) for x in inputs)
    with jax.default_matmul_precision("highest"):  # not TF32, which GPUs may use for float32
        return {name: jitted(*upcast) for name, jitted in programs("xla", scale).items()}


@jax.jit
def _rel_max_diff(a: jax.Array, b: jax.Array) -> jax.Array:
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return jnp.max(jnp.abs(a - b)) / jnp.sqrt(jnp.mean(jnp.square(b)))


def rel_max_diff(a: jax.Array, b: jax.Array) -> float:
    """max |a − b| / RMS(b), in float32 on the device (only the number comes back)."""
    return float(_rel_max_diff(a, b))


def gaps(outputs: dict, to: dict) -> dict:
    """The output's and each gradient's max |Δ| / RMS against `to`'s."""
    return {"output": rel_max_diff(outputs["forward"], to["forward"]),
            **{g: rel_max_diff(a, b) for g, a, b in zip(
                GRADS, outputs["forward_backward"], to["forward_backward"], strict=True)}}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--width", type=int, default=2048, help="heads × head dim")
    p.add_argument("--head-dim", type=int, default=ModelConfig().head_dim)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--calls", type=int, default=10, help="calls per timed repeat")
    p.add_argument("--out", type=Path, help="also write the results here as JSON")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    for name in ("batch_size", "seq_len", "width", "head_dim", "repeats", "calls"):
        if getattr(args, name) < 1:
            parser().error(f"--{name.replace('_', '-')}={getattr(args, name)}: expected a "
                           "positive integer")
    if args.width % args.head_dim:
        parser().error(f"--width={args.width}: expected a multiple of --head-dim={args.head_dim}")
    command = shlex.join([Path(sys.executable).name, "benchmarks/attention.py",
                          *(sys.argv[1:] if argv is None else argv)])
    device = jax.devices()[0]
    machine = (f"jax {jax.__version__}, {device.device_kind} ({device.platform}), "
               f"{os.cpu_count()} CPUs")
    print(f"$ {command}\n{machine}", flush=True)
    B, T, H = args.batch_size, args.seq_len, args.head_dim
    N, dtype, scale = args.width // H, jnp.dtype(args.dtype), attention_scale(args.width, H)
    keys = jax.random.split(jax.random.key(0), 4)
    inputs = tuple(jax.random.normal(key, (B, T, N, H), jnp.float32).astype(dtype)
                   for key in keys)  # q, k, v, dout
    config = {"batch_size": B, "seq_len": T, "heads": N, "head_dim": H, "dtype": dtype.name,
              "scale": scale, "causal": True, "repeats": args.repeats, "calls": args.calls}
    rows, outputs = {}, {}
    rows["xla"], outputs["xla"] = measure("xla", scale, inputs, args.repeats, args.calls)
    if device.platform != "gpu":
        cudnn = f"cudnn skipped: no cuDNN on {device.platform}"
    else:
        try:
            rows["cudnn"], outputs["cudnn"] = measure("cudnn", scale, inputs, args.repeats,
                                                      args.calls)
            cudnn = "ok"
        except Exception as error:  # noqa: BLE001 (jax and XLA raise many types; record any)
            cudnn = f"cudnn unavailable: {type(error).__name__}: {error}"[:1000]
    float32 = reference(scale, inputs)
    for name, row in rows.items():
        row["vs_float32"] = gaps(outputs[name], float32)
    result = {"command": command, "machine": machine, "config": config, "cudnn": cudnn,
              "implementations": rows, "cudnn_vs_xla": None, "speedup": None}
    if "cudnn" in rows:
        result["cudnn_vs_xla"] = gaps(outputs["cudnn"], outputs["xla"])
        result["speedup"] = {name: rows["xla"][f"{name}_ms"] / rows["cudnn"][f"{name}_ms"]
                             for name in ("forward", "forward_backward")}
    print(f"B={B} T={T} N={N} H={H} {dtype.name}: "
          + ("cudnn ok" if cudnn == "ok" else cudnn), flush=True)
    for name, row in rows.items():
        print(f"  {name}: forward {row['forward_ms']:.3f} ms, forward+backward "
              f"{row['forward_backward_ms']:.3f} ms; max |Δ|/RMS to float32 "
              + ", ".join(f"{k} {v:.2e}" for k, v in row["vs_float32"].items()), flush=True)
    if result["cudnn_vs_xla"] is not None:
        print("  cudnn vs xla: max |Δ|/RMS "
              + ", ".join(f"{k} {v:.2e}" for k, v in result["cudnn_vs_xla"].items()), flush=True)
    if args.out:
        write_json_atomic(args.out, result)
    return result


if __name__ == "__main__":
    main()
