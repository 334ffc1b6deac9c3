"""Training-step time of the framework against the same model and optimizer in plain JAX.

    python benchmarks/train_step.py --check --out train_step.json
    python benchmarks/train_step.py --width 512 --depth 8 --scan-unroll true
    python benchmarks/train_step.py --compile-only --depth 32 --scan-unroll 1

Framework: `scaling.steps.backprop.make_train_step` on the Transformer of
`scaling.parametrization.build_model` (μP, base width 64, 256-byte vocabulary) with AdamW from
`optimizer_at` (lr 1e-2, global-norm clipping at 1, cosine schedule with warmup).
Reference: the same computation written the way a JAX user would without the framework: a dict
of parameters holding a Python list of per-layer dicts, a `for` loop over the layers, and
hand-written clipping, schedule and AdamW (weight decay 0, the framework's default, so neither
side has a decay term), with per-role LR and ε factors taken from the parametrization. It starts
from the framework model's own initial parameters; `--check` runs a few steps of both from there
(the first step's LR is 0 under warmup) and compares every step's loss and the parameters.

Each program is compiled once (`jit(...).lower(...).compile()`, wall time reported) and called
once to warm up. Each repeat then times --steps-per-repeat steps of the reference followed by as
many of the framework (interleaved, as the machine may be shared). The speed ratio is the median
over repeats of reference time / framework time: the framework's speed relative to the
reference (≥ 0.95 is the target). `--mfu` divides model FLOPs per second
(`flops_per_token` × tokens per step / step time) by the device kind's nominal dense bf16 peak.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
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
from peaks import nominal_peak

from models.config import ModelConfig, compute_dtype
from optim import AdamWConfig
from scaling.config import ParamConfig
from scaling.files import write_json_atomic
from scaling.parametrization import build_model
from scaling.steps.backprop import Measure, init_train_state, make_train_step, optimizer_at

VOCAB = 256  # bytes
TOTAL_STEPS = 1000  # the schedule's horizon; it only sets the LR each step reads
# Reference parameter name -> the parametrization group whose multipliers it trains with (block
# parameters are their own groups, which depth rules scale).
ROLES = {"embed": "input", "readout": "output", "final_norm": "vector",
         "attn_norm": "vector.block", "mlp_norm": "vector.block", "wq": "hidden.block",
         "wk": "hidden.block", "wv": "hidden.block", "wo": "hidden.block",
         "w_up": "hidden.block", "w_down": "hidden.block"}


@dataclasses.dataclass(frozen=True)
class Reference:
    """Everything the plain-JAX step needs, as plain numbers."""

    head_dim: int
    rope_base: float
    attention_scale: float
    logit_multiplier: float
    dtype: jnp.dtype  # matmul operands and activations; params, norms and loss stay float32
    lr: float
    lr_mult: dict  # role -> factor on lr
    eps_mult: dict  # role -> factor on eps
    b1: float
    b2: float
    eps: float
    clip_norm: float
    warmup_steps: int
    total_steps: int
    final_lr_fraction: float


# ---------------------------------------------------------------- the plain-JAX reference


def rms_norm(x_BxTxD, gain_D, dtype):
    x_BxTxD = x_BxTxD.astype(jnp.float32)
    ms_BxTx1 = jnp.mean(jnp.square(x_BxTxD), axis=-1, keepdims=True)
    return (x_BxTxD * jax.lax.rsqrt(ms_BxTx1 + 1e-6) * gain_D).astype(dtype)


def rope_tables(seq_len: int, head_dim: int, base: float, dtype):
    """cos and sin of the rotary angles, computed in float32, applied in the compute dtype."""
    inv_freq_F = base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angle_TxF = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * inv_freq_F[None, :]
    return (jnp.cos(angle_TxF)[None, :, None, :].astype(dtype),
            jnp.sin(angle_TxF)[None, :, None, :].astype(dtype))


def apply_rope(x_BxTxNxH, cos_1xTx1xF, sin_1xTx1xF):
    x1, x2 = jnp.split(x_BxTxNxH, 2, axis=-1)
    return jnp.concatenate([x1 * cos_1xTx1xF - x2 * sin_1xTx1xF,
                            x2 * cos_1xTx1xF + x1 * sin_1xTx1xF], axis=-1)


def forward(params, tokens_BxT, ref: Reference):
    """Logits in float32; the residual stream and the matmul operands in ref.dtype."""
    dt, H = ref.dtype, ref.head_dim
    B, T = tokens_BxT.shape
    cos, sin = rope_tables(T, H, ref.rope_base, dt)
    x_BxTxD = params["embed"][tokens_BxT].astype(dt)
    D = x_BxTxD.shape[-1]
    for layer in params["layers"]:
        w = {name: p.astype(dt) for name, p in layer.items() if p.ndim == 2}
        h_BxTxD = rms_norm(x_BxTxD, layer["attn_norm"], dt)
        q_BxTxNxH = apply_rope((h_BxTxD @ w["wq"]).reshape(B, T, D // H, H), cos, sin)
        k_BxTxNxH = apply_rope((h_BxTxD @ w["wk"]).reshape(B, T, D // H, H), cos, sin)
        v_BxTxNxH = (h_BxTxD @ w["wv"]).reshape(B, T, D // H, H)
        o_BxTxNxH = jax.nn.dot_product_attention(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH,
                                                 scale=ref.attention_scale, is_causal=True)
        x_BxTxD = x_BxTxD + o_BxTxNxH.reshape(B, T, D) @ w["wo"]
        h_BxTxD = rms_norm(x_BxTxD, layer["mlp_norm"], dt)
        x_BxTxD = x_BxTxD + jax.nn.gelu(h_BxTxD @ w["w_up"]) @ w["w_down"]
    h_BxTxD = rms_norm(x_BxTxD, params["final_norm"], dt)
    logits_BxTxV = jnp.matmul(h_BxTxD, params["readout"].astype(dt),
                              preferred_element_type=jnp.float32)
    return logits_BxTxV * ref.logit_multiplier


def loss_fn(params, inputs_BxT, targets_BxT, ref: Reference):
    logits_BxTxV = forward(params, inputs_BxT, ref)
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, targets_BxT).mean()


def relative_lr(count, ref: Reference):
    """Linear warmup from 0, then cosine decay to final_lr_fraction at total_steps."""
    warmup = count / ref.warmup_steps
    progress = jnp.clip((count - ref.warmup_steps) / (ref.total_steps - ref.warmup_steps), 0, 1)
    f = ref.final_lr_fraction
    return jnp.where(count < ref.warmup_steps, warmup,
                     f + (1 - f) * 0.5 * (1 + jnp.cos(jnp.pi * progress)))


def role_tree(params, per_role: dict):
    """A tree like params whose leaves are per_role[role of the leaf]."""
    return {"embed": per_role["input"], "readout": per_role["output"],
            "final_norm": per_role["vector"],
            "layers": [{name: per_role[ROLES[name]] for name in layer}
                       for layer in params["layers"]]}


def make_reference_step(ref: Reference):
    def step(state, inputs_BxT, targets_BxT):
        params, count = state["params"], state["count"]
        loss, grads = jax.value_and_grad(loss_fn)(params, inputs_BxT, targets_BxT, ref)
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        grads = jax.tree.map(lambda g: g * jnp.minimum(1.0, ref.clip_norm / norm), grads)
        m = jax.tree.map(lambda m, g: ref.b1 * m + (1 - ref.b1) * g, state["m"], grads)
        v = jax.tree.map(lambda v, g: ref.b2 * v + (1 - ref.b2) * g * g, state["v"], grads)
        t = count + 1
        lr = ref.lr * relative_lr(count, ref)

        def update(p, m, v, lr_mult, eps_mult):
            m_hat, v_hat = m / (1 - ref.b1**t), v / (1 - ref.b2**t)
            return p - lr * lr_mult * m_hat / (jnp.sqrt(v_hat) + ref.eps * eps_mult)

        params = jax.tree.map(update, params, m, v, role_tree(params, ref.lr_mult),
                              role_tree(params, ref.eps_mult))
        return {"params": params, "m": m, "v": v, "count": t}, loss

    return jax.jit(step, donate_argnums=0)


def reference_params(framework_params) -> dict:
    """Copies of the framework's parameters, its stacked blocks split into a list of layers."""
    host = jax.tree.map(np.asarray, framework_params)  # slicing here compiles nothing
    blocks = host["blocks"]
    return {"embed": jnp.asarray(host["embed"]), "final_norm": jnp.asarray(host["final_norm"]),
            "readout": jnp.asarray(host["readout"]),
            "layers": [{name: jnp.asarray(stack[i]) for name, stack in blocks.items()}
                       for i in range(blocks["wq"].shape[0])]}


def stacked(reference) -> dict:
    """The reference's parameters in the framework's layout, on the host, for comparison."""
    host = jax.tree.map(np.asarray, reference)
    layers = host["layers"]
    return {"embed": host["embed"], "final_norm": host["final_norm"],
            "readout": host["readout"],
            "blocks": {name: np.stack([layer[name] for layer in layers]) for name in layers[0]}}


def init_reference_state(params) -> dict:
    zeros = lambda: jax.tree.map(lambda p: jnp.asarray(np.zeros(p.shape, p.dtype)), params)
    return {"params": params, "m": zeros(), "v": zeros(), "count": jnp.zeros((), jnp.int32)}


# ---------------------------------------------------------------- both sides, timed


@dataclasses.dataclass
class Setup:
    model: nnx.Module
    specs: dict
    framework_params: dict
    framework_step: object
    tx: optax.GradientTransformation
    reference: Reference
    inputs_BxT: jax.Array
    targets_BxT: jax.Array


def build(args) -> Setup:
    model_cfg = ModelConfig(
        width=args.width, depth=args.depth, head_dim=args.head_dim, mlp_ratio=args.mlp_ratio,
        compute_dtype=args.compute_dtype,
        **({} if args.scan_unroll is None else {"scan_unroll": args.scan_unroll}))
    model, parametrization = build_model(model_cfg, ParamConfig("mup", args.base_width), VOCAB,
                                         seed=0)
    graphdef, _ = nnx.split(model)
    opt_cfg = AdamWConfig(lr=args.lr, clip_norm=1.0, schedule="cosine", warmup_steps=20)
    tx = optimizer_at(opt_cfg, parametrization, total_steps=TOTAL_STEPS)
    mults = parametrization.optimizer_multipliers(opt_cfg)
    reference = Reference(
        head_dim=model_cfg.head_dim, rope_base=model_cfg.rope_base,
        attention_scale=parametrization.attention_scale,
        logit_multiplier=parametrization.logit_multiplier,
        dtype=compute_dtype(args.compute_dtype), lr=opt_cfg.lr,
        lr_mult={role: m.lr for role, m in mults.items()},
        eps_mult={role: m.eps for role, m in mults.items()}, b1=opt_cfg.b1, b2=opt_cfg.b2,
        eps=opt_cfg.eps, clip_norm=opt_cfg.clip_norm, warmup_steps=opt_cfg.warmup_steps,
        total_steps=TOTAL_STEPS, final_lr_fraction=opt_cfg.final_lr_fraction)
    tokens_Bx1T = jax.random.randint(jax.random.key(1), (args.batch_size, args.seq_len + 1), 0,
                                     VOCAB)
    return Setup(model, parametrization.specs, nnx.state(model, nnx.Param).to_pure_dict(),
                 # the loop's step with logging.indicators=false: it measures the gradient
                 # norm and clip factor only, which the clipping computes anyway
                 make_train_step(graphdef, tx, Measure.of(opt_cfg, parametrization,
                                                          indicators=False)),
                 tx, reference, tokens_Bx1T[:, :-1],
                 tokens_Bx1T[:, 1:])


def fresh_states(s: Setup, sides=("reference", "framework")) -> dict:
    """A new initial state for each side (both donate theirs)."""
    make = {"reference": lambda: init_reference_state(reference_params(s.framework_params)),
            "framework": lambda: init_train_state(jax.tree.map(jnp.copy, s.framework_params),
                                                  s.tx, s.reference.lr)}
    return {side: make[side]() for side in sides}


def compile_timed(jitted, *args):
    started = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - started


def memory_gb(compiled) -> dict | None:
    """XLA's own accounting of the step's device memory (None where the backend gives none)."""
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    return {"arguments": stats.argument_size_in_bytes / 1e9,
            "temporaries": stats.temp_size_in_bytes / 1e9,
            "peak": getattr(stats, "peak_memory_in_bytes", 0) / 1e9 or None}


class Side:
    """A compiled step and the state it advances; each step also returns what it measured (the
    reference: the loss; the framework: the gradient norm and clip factor)."""

    def __init__(self, name: str, compiled, state):
        self.name, self.compiled, self.state = name, compiled, state
        self.times: list[float] = []

    def step(self, x, y):
        self.state, _ = self.compiled(self.state, x, y)

    def run(self, steps: int, x, y) -> float:
        started = time.perf_counter()
        for _ in range(steps):
            self.step(x, y)
        jax.block_until_ready(self.state)
        return time.perf_counter() - started


def check(s: Setup, compiled: dict, steps: int) -> dict:
    """Losses and parameters after `steps` steps of both sides from the same start."""
    states = fresh_states(s)
    ref_state, fw_state = states["reference"], states["framework"]
    ref_losses, fw_losses = [], []
    for _ in range(steps):
        ref_state, loss = compiled["reference"](ref_state, s.inputs_BxT, s.targets_BxT)
        ref_losses.append(float(loss))
        before = float(fw_state.loss_sum)  # the framework's state sums the losses
        fw_state, _ = compiled["framework"](fw_state, s.inputs_BxT, s.targets_BxT)
        fw_losses.append(float(fw_state.loss_sum) - before)
    start = jax.tree.map(np.asarray, s.framework_params)
    ref_params = stacked(ref_state["params"])
    fw_params = jax.tree.map(np.asarray, fw_state.params)
    max_abs = lambda a, b: float(np.max(np.abs(a - b)))
    diff = jax.tree.map(max_abs, fw_params, ref_params)
    moved = jax.tree.map(max_abs, ref_params, start)
    update_rel = _relative(jax.tree.map(np.subtract, fw_params, start),
                           jax.tree.map(np.subtract, ref_params, start))
    exact = s.reference.dtype == jnp.float32 and jax.default_backend() == "cpu"
    # bf16 and TF32 matmuls order their roundings differently on the two sides
    loss_tol, update_tol = (1e-5, 1e-3) if exact else (2e-2, 1e-1)
    loss_diff = max(abs(a - b) for a, b in zip(ref_losses, fw_losses, strict=True))
    return {"steps": steps, "reference_losses": ref_losses, "framework_losses": fw_losses,
            "max_abs_loss_diff": loss_diff, "max_abs_param_diff": max(jax.tree.leaves(diff)),
            "max_abs_param_diff_by_leaf": {
                "/".join(str(getattr(k, "key", k)) for k in path): v
                for path, v in jax.tree_util.tree_leaves_with_path(diff)},
            "max_abs_param_change": max(jax.tree.leaves(moved)),
            "relative_update_diff": update_rel, "loss_tolerance": loss_tol,
            "update_tolerance": update_tol,
            "matched": loss_diff <= loss_tol and update_rel <= update_tol}


def _relative(a, b) -> float:
    """‖a − b‖ / ‖b‖ over whole trees."""
    num = sum(float(np.sum(np.square(x - y, dtype=np.float64))) for x, y in
              zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
    den = sum(float(np.sum(np.square(y, dtype=np.float64))) for y in jax.tree.leaves(b))
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)


def mfu(s: Setup, args, step_s: float) -> dict:
    per_token = s.model.flops_per_token(args.seq_len)
    rate = per_token * args.batch_size * args.seq_len / step_s
    kind = jax.devices()[0].device_kind
    known = None if jax.default_backend() == "cpu" else nominal_peak(kind)
    peak = known and known[1]
    return {"flops_per_token": per_token, "model_flops_per_s": rate, "device_kind": kind,
            "nominal_bf16_peak": peak, "mfu": None if peak is None else rate / peak}


def measure(args) -> dict:
    s = build(args)
    sides = ["framework"] if args.framework_only else ["reference", "framework"]
    states = fresh_states(s, sides)
    steps = {"reference": make_reference_step(s.reference), "framework": s.framework_step}
    compiled, compile_s = {}, {}
    for name in sides:
        compiled[name], compile_s[name] = compile_timed(steps[name], states[name], s.inputs_BxT,
                                                        s.targets_BxT)
        progress(f"{name}: compiled in {compile_s[name]:.1f} s")
    result = {"compile_s": compile_s, "memory_gb": {name: memory_gb(c) for name, c in
                                                   compiled.items()},
              "check": None, "step_ms": None, "step_ms_all": None, "speed_ratio": None,
              "speed_ratios": None, "mfu": None}
    if args.compile_only:
        return result
    if args.check and not args.framework_only:
        result["check"] = check(s, compiled, args.check_steps)
        progress(f"check: matched={result['check']['matched']}")
    runs = {name: Side(name, compiled[name], states[name]) for name in sides}
    for side in runs.values():
        side.run(1, s.inputs_BxT, s.targets_BxT)  # warm-up
    for repeat in range(args.repeats):
        for side in runs.values():
            side.times.append(side.run(args.steps_per_repeat, s.inputs_BxT, s.targets_BxT)
                              / args.steps_per_repeat)
        progress(f"repeat {repeat + 1}/{args.repeats}")
    result["step_ms"] = {name: 1e3 * statistics.median(side.times) for name, side in runs.items()}
    result["step_ms_all"] = {name: [1e3 * t for t in side.times] for name, side in runs.items()}
    if not args.framework_only:
        ratios = [r / f for r, f in zip(runs["reference"].times, runs["framework"].times,
                                        strict=True)]
        result["speed_ratios"], result["speed_ratio"] = ratios, statistics.median(ratios)
    if args.mfu:
        result["mfu"] = {name: mfu(s, args, side_ms / 1e3)
                         for name, side_ms in result["step_ms"].items()}
    return result


# ---------------------------------------------------------------- command line


def unroll_arg(value: str) -> int | bool:
    text = value.strip().lower()
    if text in ("true", "false"):
        return text == "true"
    if re.fullmatch(r"[1-9][0-9]*", text):
        return int(text)
    raise argparse.ArgumentTypeError(f"{value!r}: expected a positive integer, true or false")


def fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def table(cfg: dict, r: dict) -> str:
    lines = [(f"width {cfg['width']}, depth {cfg['depth']}, batch {cfg['batch_size']}×"
              f"{cfg['seq_len']}, {cfg['resolved_compute_dtype']}, scan_unroll "
              f"{cfg['scan_unroll']}"),
             "| side | compile s | step ms | speed vs reference | model TFLOP/s | MFU |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, compile_s in r["compile_s"].items():
        step = (r["step_ms"] or {}).get(name)
        m = (r["mfu"] or {}).get(name) or {}
        speed = (1.0 if name == "reference" else r.get("speed_ratio")) if step else None
        rate = m.get("model_flops_per_s")
        lines.append(f"| {name} | {compile_s:.2f} | {fmt(step, '.2f')} | {fmt(speed, '.3f')} "
                     f"| {fmt(rate and rate / 1e12, '.3g')} | {fmt(m.get('mfu'), '.1%')} |")
    c = r["check"]
    if c:
        lines.append(f"check over {c['steps']} steps: max |Δloss| {c['max_abs_loss_diff']:.2e}, "
                     f"max |Δparam| {c['max_abs_param_diff']:.2e} (params moved up to "
                     f"{c['max_abs_param_change']:.2e}), relative update difference "
                     f"{c['relative_update_diff']:.2e} → "
                     + ("matched" if c["matched"] else "NOT matched"))
    return "\n".join(lines)


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)  # long runs: show where they are


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--mlp-ratio", type=int, default=4)
    p.add_argument("--base-width", type=int, default=64, help="μP base width")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--batch-size", type=int, default=32, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--steps-per-repeat", type=int, default=5)
    p.add_argument("--scan-unroll", type=unroll_arg, metavar="{K,true,false}",
                   help="the framework's jax.lax.scan unroll over layers (default: ModelConfig's)")
    p.add_argument("--compute-dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="matmul and activation dtype of both sides (auto: bf16 off CPU)")
    p.add_argument("--compile-only", action="store_true", help="only the compile times")
    p.add_argument("--check", action="store_true", help="compare both sides over a few steps")
    p.add_argument("--check-steps", type=int, default=3)
    p.add_argument("--framework-only", action="store_true",
                   help="time the framework alone (large models: no second copy of the state)")
    p.add_argument("--mfu", action="store_true", help="model FLOPs per second and MFU")
    p.add_argument("--out", type=Path, help="also write the results here as JSON")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    for name in ("width", "depth", "batch_size", "seq_len", "repeats", "steps_per_repeat",
                 "check_steps"):
        if getattr(args, name) < 1:
            parser().error(f"--{name.replace('_', '-')}={getattr(args, name)}: expected a "
                           "positive integer")
    if args.width % args.head_dim:
        parser().error(f"--width={args.width}: expected a multiple of --head-dim={args.head_dim}")
    command = shlex.join([Path(sys.executable).name, "benchmarks/train_step.py",
                          *(sys.argv[1:] if argv is None else argv)])
    device = jax.devices()[0]
    machine = (f"jax {jax.__version__}, {device.device_kind} ({device.platform}), "
               f"{os.cpu_count()} CPUs")
    print(f"$ {command}\n{machine}", flush=True)
    result = measure(args)
    cfg = {key: getattr(args, key) for key in (
        "width", "depth", "head_dim", "mlp_ratio", "base_width", "lr", "batch_size", "seq_len",
        "repeats", "steps_per_repeat", "compute_dtype", "framework_only")}
    cfg["scan_unroll"] = (ModelConfig().scan_unroll if args.scan_unroll is None
                          else args.scan_unroll)
    cfg["resolved_compute_dtype"] = np.dtype(compute_dtype(args.compute_dtype)).name
    print(table(cfg, result), flush=True)
    payload = {"command": command, "machine": machine, "config": cfg, **result}
    if args.out:
        write_json_atomic(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
