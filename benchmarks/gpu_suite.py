"""Every GPU measurement of the project in one process, each into OUT_DIR/<name>.json.

    PYTHONPATH=. bash benchmarks/gpu.sh OUT_DIR           # on the GPU machine
    PYTHONPATH=. bash benchmarks/gpu.sh --tiny OUT_DIR    # tiny sizes on CPU: has it rotted?

Run it through benchmarks/gpu.sh, which bounds the whole run's time. The measurements run in
the order of MEASUREMENTS, each calling a benchmark's own main. A measurement that raises is
recorded as failed and the next one runs. Each has a time limit, enforced by a watchdog thread
that records the overrun and ends the process (a stuck compile or kernel cannot be interrupted
from Python); gpu.sh then starts the suite again, and it skips every measurement that
OUT_DIR/summary.json already records. `--summarize` writes OUT_DIR/summary.txt, one line per
measurement, and exits 0 only if every one succeeded.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import importlib.util
import json
import math
import os
import sys
import threading
import time
import traceback
import types
from collections.abc import Callable
from pathlib import Path

STARTED = time.monotonic()  # --budget-s counts from here, JAX's import included
RETRY_EXIT = 75  # the watchdog stopped a measurement: gpu.sh starts the suite again
MIN_START_S = 10  # with less of the budget left, no measurement is started
NS_BF16_REL = 0.06  # Pallas vs XLA bf16 relative gap the kernel tests accept (BF16_REL)
MFU_SHAPE = ["--width", "2048", "--depth", "24", "--seq-len", "1024"]


@dataclasses.dataclass(frozen=True)
class Measurement:
    name: str
    limit_s: float  # on the GPU; tiny mode shares one limit
    run: Callable[[Path, argparse.Namespace], dict]  # (its JSON path, options) -> headline


def call_main(module: str, argv: list[str]):
    """`benchmarks.<module>.main()` as if run with argv; a failed exit raises."""
    main = importlib.import_module(f"benchmarks.{module}").main
    saved = sys.argv
    sys.argv = [f"benchmarks/{module}.py", *argv]
    try:
        return main()
    except SystemExit as stop:
        if stop.code not in (0, None):
            raise RuntimeError(f"benchmarks/{module}.py {' '.join(argv)}: exited with "
                               f"{stop.code}") from None
    finally:
        sys.argv = saved


def ns_kernels(out: Path, opts) -> dict:
    sizes = (["--allow-interpret", "--shapes", "48x48", "32x80", "--repeats", "1",
              "--peak-size", "64"] if opts.tiny else
             ["--shapes", "1024x1024", "4096x4096", "4096x14336", "--repeats", "5"])
    call_main("orthogonalize_kernels", [*sizes, "--dtype", "bfloat16", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    worst = max(r["rel_diff"] for r in rows)
    return {"matched": worst <= NS_BF16_REL, "max_rel_diff": worst,
            "speedup": {r["shape"]: r["speedup"] for r in rows},
            "roofline_measured": {r["shape"]: r["roofline_measured"] for r in rows},
            "line": "pallas/xla speedup " + ", ".join(
                f"{r['shape']} {r['speedup']:.2f}×" for r in rows)
                    + f"; max rel diff {worst:.3f} ("
                    + ("matched" if worst <= NS_BF16_REL else "NOT matched") + ")"}


def mezo_memory(out: Path, opts) -> dict:
    """MeZO's step peak against a forward pass and AdamW's step: compiled-program analysis at
    depths 2 and 8 (width 512, 8 × 512 tokens), and the device's peak_bytes_in_use after running
    each once at depth 8. The naive contrast is left to the CPU run (benchmarks/mezo_memory.py)."""
    sizes = (["--width", "32", "--depths", "1", "--seq-len", "16", "--batch-size", "2"]
             if opts.tiny else ["--depths", "2", "8"])
    call_main("mezo_memory", [*sizes, "--scan-unroll", "true", "--naive-max-depth", "0",
                              "--device-peak", "--out", str(out)])
    r = json.loads(out.read_text())
    row, device = r["rows"][-1], r["device_peak"]
    estimate = [row_["programs"]["mezo_estimate"]["temporaries"] for row_ in r["rows"]]
    counted = device["bytes"] is not None  # the CPU backend keeps no counter
    headline = {"mezo_over_forward": row["mezo_over_forward"],
                "adamw_over_mezo": row["adamw_over_mezo"], "targets_met": row["targets_met"],
                "peak_source": row["peak_source"], "estimate_temporaries": estimate,
                "device_mezo_over_forward_at_most":
                    device["mezo_over_forward_at_most"] if counted else None,
                "device_adamw_over_mezo_at_least":
                    device["adamw_over_mezo_at_least"] if counted else None}
    line = (f"depth {row['depth']}: MeZO/forward {row['mezo_over_forward']:.2f}, AdamW/MeZO "
            f"{row['adamw_over_mezo']:.1f} (compiled, {row['peak_source']} peaks); MeZO "
            f"estimate temporaries by depth {', '.join(f'{t / 1e6:.1f}' for t in estimate)} MB")
    if counted:
        line += (f"; device peak: MeZO/forward ≤ {device['mezo_over_forward_at_most']:.2f}, "
                 f"AdamW/MeZO ≥ {device['adamw_over_mezo_at_least']:.1f}"
                 + ("" if device["clean_start"] else " (NOT a clean start)"))
    return {**headline, "line": line}


def muon_step(width: int):
    """Our Muon step against optax.contrib.muon at one width (its own file: a slow width loses
    only itself)."""
    def run(out: Path, opts) -> dict:
        sizes = (["--widths", "64", "--depth", "1", "--repeats", "1",
                  "--batch-size", "2", "--seq-len", "16"] if opts.tiny else
                 ["--widths", str(width), "--depth", "4", "--repeats", "3"])
        call_main("muon_step", [*sizes, "--rows", "optax", "default", "--out", str(out)])
        [r] = [r for r in json.loads(out.read_text())["results"] if r["row"] == "default"]
        return {"ratio_to_optax": r["ratio_to_peer"], "train_step_ms": r["train_step_ms"],
                "line": f"width {r['width']}: ours/optax optimizer step time "
                        f"{r['ratio_to_peer']:.2f} ({r['opt_step_ms']:.1f} ms), train step "
                        f"{r['train_step_ms']:.1f} ms"}
    return run


def vectorize_lr(out: Path, opts) -> dict:
    sizes = (["--width", "32", "--depth", "1", "--lrs", "2", "--steps", "3", "--batch-size",
              "2", "--seq-len", "16"] if opts.tiny else
             ["--width", "256", "--depth", "2", "--lrs", "4", "--steps", "60", "--batch-size",
              "32", "--seq-len", "128"])
    call_main("vectorize_lr", [*sizes, "--out", str(out)])
    r = json.loads(out.read_text())
    return {"ratio": r["ratio"], "line": f"K LRs together / separately {r['ratio']:.2f} "
                                         f"({r['together_s']:.1f} s vs {r['separate_s']:.1f} s), "
                                         f"max |Δ val loss| {r['max_val_loss_difference']:.1e}"}


def train_step_vs_reference(width: int, depth: int):
    """The framework's step against plain JAX at one shape, checked to agree."""
    def run(out: Path, opts) -> dict:
        sizes = (["--width", "32", "--depth", "1", "--batch-size", "2", "--seq-len", "16",
                  "--repeats", "2", "--steps-per-repeat", "1", "--check-steps", "2"]
                 if opts.tiny else ["--width", str(width), "--depth", str(depth), "--repeats",
                                    "10", "--steps-per-repeat", "10"])
        r = call_main("train_step", [*sizes, "--check", "--mfu", "--out", str(out)])
        return {"speed_ratio": r["speed_ratio"], "matched": r["check"]["matched"],
                "line": f"framework speed / plain JAX {r['speed_ratio']:.3f} "
                        f"({r['step_ms']['framework']:.2f} vs {r['step_ms']['reference']:.2f} "
                        f"ms), compile {r['compile_s']['framework']:.1f} vs "
                        f"{r['compile_s']['reference']:.1f} s, check "
                        + ("matched" if r["check"]["matched"] else "NOT matched")}
    return run


def train_step_mfu(out: Path, opts) -> dict:
    """The framework alone at 2048 × 24; on running out of memory, half the batch."""
    shape = (["--width", "32", "--depth", "1", "--seq-len", "16", "--repeats", "1",
              "--steps-per-repeat", "1"] if opts.tiny else
             [*MFU_SHAPE, "--repeats", "5", "--steps-per-repeat", "3"])
    batch, tried = 2 if opts.tiny else opts.mfu_batch_size, []
    while True:
        tried.append(batch)
        try:
            r = call_main("train_step", [
                *shape, "--batch-size", str(batch), "--compute-dtype", "bfloat16",
                "--scan-unroll", opts.mfu_scan_unroll, "--framework-only", "--mfu", "--out",
                str(out)])
            break
        except Exception as error:  # XLA raises its own runtime error types
            if "RESOURCE_EXHAUSTED" not in str(error) or batch == 1:
                raise
        free_device_memory()  # out here: the except block's traceback holds the failed run
        batch //= 2
    m = r["mfu"]["framework"]
    mfu = m["mfu"]
    return {"batch_sizes_tried": tried, "mfu": mfu, "step_ms": r["step_ms"]["framework"],
            "line": f"batch {batch}×{r['config']['seq_len']}: {r['step_ms']['framework']:.1f} "
                    f"ms/step, {m['model_flops_per_s'] / 1e12:.1f} model TFLOP/s, MFU "
                    + ("— (no nominal peak)" if mfu is None else f"{mfu:.1%}")
                    + (f" (batch {tried[:-1]} ran out of memory)" if len(tried) > 1 else "")}


SHARDING_TINY_MODEL = ["model.width=32", "model.depth=1", "train.batch_size=8",
                       "train.seq_len=16"]


def sharding(out: Path, opts) -> dict:
    """The train step on a mesh of every device (one GPU: the mesh machinery's own cost) and
    Muon's update with stacked matrices against compiler-split Newton–Schulz."""
    sizes = (["--repeats", "1", "--steps", "1", "--widths", "32", "--meshes", "single", "fsdp",
              "--", *SHARDING_TINY_MODEL]
             if opts.tiny else ["--repeats", "5", "--steps", "10", "--widths", "1024"])
    r = call_main("sharding", ["--out", str(out), *sizes])
    fsdp, muon = r["train_step"]["fsdp"], next(iter(r["muon_update"].values()))
    return {"fsdp_ratio": fsdp["ratio"], "stack_ratio": muon["stack"]["ratio"],
            "line": f"{r['devices']} device(s): mesh=fsdp step {fsdp['ratio']:.2f}× no mesh "
                    f"({fsdp['ms']:.1f} ms); Muon stack {muon['stack']['ratio']:.2f}× compiler"}


def attention(out: Path, opts) -> dict:
    """Causal attention through jax.nn.dot_product_attention at the MFU run's shape in bf16:
    cuDNN's fused kernel against XLA's, forward and forward + backward, and how far their
    outputs differ. Where cuDNN's is not available it records why and times XLA's alone; on CPU
    (tiny) it is not tried."""
    mfu = dict(zip(MFU_SHAPE[::2], MFU_SHAPE[1::2]))
    sizes = (["--batch-size", "2", "--seq-len", "16", "--width", "64", "--repeats", "1",
              "--calls", "1"] if opts.tiny else
             ["--batch-size", str(opts.mfu_batch_size), "--seq-len", mfu["--seq-len"],
              "--width", mfu["--width"], "--repeats", "5", "--calls", "10"])
    r = call_main("attention", [*sizes, "--dtype", "bfloat16", "--out", str(out)])
    rows, c = r["implementations"], r["config"]
    shape = f"{c['batch_size']}×{c['seq_len']}×{c['heads']}×{c['head_dim']} {c['dtype']}"
    headline = {"cudnn": r["cudnn"],
                **{f"{name}_ms": {impl: row[f"{name}_ms"] for impl, row in rows.items()}
                   for name in ("forward", "forward_backward")},
                "max_rel_diff": r["cudnn_vs_xla"] and r["cudnn_vs_xla"]["output"],
                "speedup": r["speedup"]}
    x = rows["xla"]
    if r["cudnn"] != "ok":
        line = (f"{shape}: xla forward {x['forward_ms']:.2f} ms, forward+backward "
                f"{x['forward_backward_ms']:.2f} ms; {r['cudnn'][:300]}")
    else:
        d, cu = r["cudnn_vs_xla"], rows["cudnn"]
        line = (f"{shape}: cudnn vs xla forward {cu['forward_ms']:.2f} vs {x['forward_ms']:.2f} "
                f"ms (xla/cudnn {r['speedup']['forward']:.2f}×), forward+backward "
                f"{cu['forward_backward_ms']:.2f} vs {x['forward_backward_ms']:.2f} ms "
                f"(xla/cudnn {r['speedup']['forward_backward']:.2f}×); max |Δ out|/RMS "
                f"{d['output']:.1e} (xla vs float32 {x['vs_float32']['output']:.1e})")
    return {**headline, "line": line}


# Limits on the GPU add up to gpu.sh's budget less its margin, so each gets its own in full.
# Tiny mode runs repeated measurements at one shape: the compilation cache serves the repeats.
# mezo_memory runs first: the device's peak_bytes_in_use counter only grows within a process.
MEASUREMENTS = (
    Measurement("mezo_memory", 45, mezo_memory),
    Measurement("ns_kernels", 55, ns_kernels),
    Measurement("muon_step_w1024", 35, muon_step(1024)),
    Measurement("muon_step_w4096", 60, muon_step(4096)),
    Measurement("vectorize_lr", 50, vectorize_lr),
    Measurement("train_step_default", 35, train_step_vs_reference(128, 4)),
    Measurement("train_step_w512_d8", 35, train_step_vs_reference(512, 8)),
    Measurement("train_step_mfu", 105, train_step_mfu),
    Measurement("sharding", 25, sharding),
    Measurement("attention", 20, attention),  # last: a crash inside cuDNN loses only itself
)
NAMES = tuple(m.name for m in MEASUREMENTS)


# ---------------------------------------------------------------- bookkeeping


class Summary:
    """OUT_DIR/summary.json: one record per measurement, rewritten whole after every change."""

    def __init__(self, out_dir: Path, mode: str):
        self.path, self.lock = out_dir / "summary.json", threading.Lock()
        self.data = (json.loads(self.path.read_text()) if self.path.exists()
                     else {"mode": mode, "measurements": {}})
        if self.data["mode"] != mode:
            raise SystemExit(f"gpu_suite: {self.path} holds a {self.data['mode']} run, not "
                             f"{mode}; use an empty OUT_DIR")

    def record(self, name: str, **fields) -> None:
        with self.lock:
            self.data["measurements"].setdefault(name, {}).update(fields)
            tmp = self.path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(self.data, indent=2, sort_keys=True))
            tmp.replace(self.path)

    def status(self, name: str) -> str | None:
        return self.data["measurements"].get(name, {}).get("status")


def line_of(name: str, record: dict | None) -> str:
    if record is None:
        return f"{name}: not run (the time budget ran out first)"
    status = record["status"]
    if status == "ok":
        return f"{name}: ok in {record['seconds']:.0f} s: {record['line']}"
    if status == "running":
        return f"{name}: KILLED at gpu.sh's time budget (started, never finished)"
    return f"{name}: {status.upper()} after {record['seconds']:.0f} s: {record['error']}"


def free_device_memory() -> None:
    gc.collect()  # the last measurement's arrays; compiled programs hold no large buffers


def stub_tqdm_if_missing() -> None:
    """scaling.training.loop imports tqdm for its progress bar, which the benchmarks turn off;
    the GPU machine's preinstalled packages may lack it."""
    if importlib.util.find_spec("tqdm") is not None:
        return
    bar = type("tqdm", (), {"__init__": lambda self, *a, **k: None,
                            "update": lambda self, n=1: None,
                            "set_postfix": lambda self, *a, **k: None,
                            "close": lambda self: None})
    for name in ("tqdm", "tqdm.auto"):
        sys.modules[name] = types.SimpleNamespace(tqdm=bar, __name__=name)


def run_all(opts) -> int:
    import jax

    summary = Summary(opts.out_dir, "tiny" if opts.tiny else "full")
    backend = jax.default_backend()
    if not opts.tiny and backend == "cpu":
        raise SystemExit("gpu_suite: the full run needs a GPU and JAX sees only the CPU; "
                         "use --tiny for a CPU check")
    stub_tqdm_if_missing()
    deadline = STARTED + opts.budget_s
    failed = False
    for m in MEASUREMENTS:
        status = summary.status(m.name)
        if status is not None:  # a previous process ran it (or its watchdog stopped it)
            failed |= status != "ok"
            continue
        left = deadline - time.monotonic()
        if left < MIN_START_S:
            print(line_of(m.name, None), flush=True)
            failed = True
            continue
        limit = min(opts.tiny_limit_s if opts.tiny else m.limit_s, left)
        failed |= not run_one(m, limit, summary, opts)
        free_device_memory()
    return 1 if failed else 0


def run_one(m: Measurement, limit: float, summary: Summary, opts) -> bool:
    started = time.monotonic()
    summary.record(m.name, status="running", limit_s=limit, json=f"{m.name}.json")

    def overrun():
        summary.record(m.name, status="timed out", seconds=time.monotonic() - started,
                       error=f"no result within its limit of {limit:.0f} s")
        print(line_of(m.name, summary.data["measurements"][m.name]), flush=True)
        os._exit(RETRY_EXIT)  # the main thread may be inside XLA: no exception can reach it

    watchdog = threading.Timer(limit, overrun)
    watchdog.daemon = True
    watchdog.start()
    print(f"=== {m.name} (limit {limit:.0f} s)", flush=True)
    try:
        headline = m.run(opts.out_dir / f"{m.name}.json", opts)
        record = {"status": "ok", "line": headline.pop("line"), "headline": headline}
    except Exception as error:  # noqa: BLE001 (record any failure and go on to the next)
        traceback.print_exc()
        record = {"status": "failed", "error": f"{type(error).__name__}: {error}"[:2000]}
    finally:
        watchdog.cancel()
    summary.record(m.name, seconds=time.monotonic() - started, **record)
    print(line_of(m.name, summary.data["measurements"][m.name]), flush=True)
    return record["status"] == "ok"


def summarize(out_dir: Path) -> int:
    path = out_dir / "summary.json"
    records = json.loads(path.read_text())["measurements"] if path.exists() else {}
    lines = [line_of(name, records.get(name)) for name in NAMES]
    (out_dir / "summary.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(["", "summary:", *lines]))
    ok = all(records.get(name, {}).get("status") == "ok" for name in NAMES)
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--tiny", action="store_true", help="tiny sizes, on CPU")
    parser.add_argument("--budget-s", type=float, default=math.inf,
                        help="seconds this process may run (gpu.sh passes what is left)")
    parser.add_argument("--tiny-limit-s", type=float, default=60,
                        help="tiny mode: every measurement's time limit")
    parser.add_argument("--mfu-batch-size", type=int, default=16,
                        help="sequences per step of the MFU run (halved on out-of-memory)")
    parser.add_argument("--mfu-scan-unroll", default="1",
                        help="the MFU run's scan unroll (1: a rolled loop, whose compile time "
                             "stays flat in depth; true: every layer unrolled)")
    parser.add_argument("--summarize", action="store_true",
                        help="only write OUT_DIR/summary.txt from summary.json")
    opts = parser.parse_args()
    if opts.mfu_batch_size < 1:
        parser.error(f"--mfu-batch-size={opts.mfu_batch_size}: expected a positive integer")
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    return summarize(opts.out_dir) if opts.summarize else run_all(opts)


if __name__ == "__main__":
    sys.exit(main())
