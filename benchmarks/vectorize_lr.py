"""Wall time of K learning rates trained together (`sweep.vectorize_lr=K`) vs K separate runs.

    python benchmarks/vectorize_lr.py --width 64 --lrs 4 --steps 60

Both sides include compilation, as a sweep pays it: separate runs compile once per run.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shlex
import sys
import tempfile
import time
from pathlib import Path

from optim import AdamWConfig
from scaling.config import (
    LoggingConfig,
    ModelConfig,
    ParamConfig,
    RunConfig,
    TrainConfig,
)
from scaling.files import write_json_atomic
from scaling.training.loop import train, train_lrs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--lrs", type=int, default=4, help="K: learning rates trained together")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--out", type=Path, help="also write the results here as JSON")
    args = parser.parse_args()
    lrs = [2.0 ** (-10 + i) for i in range(args.lrs)]
    with tempfile.TemporaryDirectory() as out:
        cfg = RunConfig(
            model=ModelConfig(width=args.width, depth=args.depth), param=ParamConfig(),
            optim=AdamWConfig(warmup_steps=min(10, args.steps - 1)),
            train=TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                              eval_every=args.steps, checkpoint_every=args.steps, out_dir=out),
            logging=LoggingConfig(wandb_mode="disabled", progress=False))
        started = time.perf_counter()
        together = train_lrs(dataclasses.replace(cfg, train=dataclasses.replace(
            cfg.train, out_dir=f"{out}/together")), lrs)
        t_together = time.perf_counter() - started
        started = time.perf_counter()
        separate = [train(dataclasses.replace(
            cfg, optim=dataclasses.replace(cfg.optim, lr=lr),
            train=dataclasses.replace(cfg.train, out_dir=f"{out}/separate"))) for lr in lrs]
        t_separate = time.perf_counter() - started
    differences = [abs(a["val_loss"] - b["val_loss"])
                   for a, b in zip(together, separate, strict=True)]
    worst = max(differences)
    for lr, a, d in zip(lrs, together, differences, strict=True):
        print(f"  lr 2^{math.log2(lr):g}: val loss {a['val_loss']:.4f}, |difference| {d:.1e}")
    print(f"width={args.width} depth={args.depth} K={args.lrs} steps={args.steps} "
          f"batch={args.batch_size}x{args.seq_len}: together {t_together:.1f}s, "
          f"separate {t_separate:.1f}s, ratio {t_together / t_separate:.2f}, "
          f"max |val loss difference| {worst:.2e}")
    if args.out is not None:
        write_json_atomic(args.out, {
            "command": shlex.join([Path(sys.executable).name, *sys.argv]), "width": args.width,
            "depth": args.depth, "lrs": lrs, "steps": args.steps, "together_s": t_together,
            "separate_s": t_separate, "ratio": t_together / t_separate,
            "max_val_loss_difference": worst})


if __name__ == "__main__":
    main()
