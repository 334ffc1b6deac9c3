"""Learning-rate transfer across width for the three user-model examples (docs/examples/):
an MLP on a teacher's regression, a CNN and a ViT on a teacher's classes, each under SP and μP
with the same optimizer (Muon by default), on an LR grid at several widths and seeds. Prints the
optimal log2 LR per width and its drift per width doubling, and writes the curves as JSON.

    python benchmarks/any_model_transfer.py --out runs/any_model_transfer.json

The LR is an argument of one compiled step per shape: every family's update is linear in its
LR (the Adam groups' at their ratio, decoupled weight decay included), so the step applies the
optimizer built at LR 1 and scales its update. Every step draws fresh samples of the teacher's
task (no sample is seen twice, so nothing is memorized), and the loss is on 512 held-out ones.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "docs" / "examples"))

import cnn
import mlp_teacher
import vit

import optim
from scaling.any_model import parametrize
from scaling.files import write_json_atomic
from scaling.fits import fit_optimum
from scaling.parametrization import build_optimizer

EXAMPLES = {"mlp": (mlp_teacher, mlp_teacher.MLP), "cnn": (cnn, cnn.CNN),
            "vit": (vit, vit.ViT)}
STEPS = {"mlp": 150, "cnn": 150, "vit": 300}  # the ViT's loss plateaus at chance first
OPTIMIZERS = {"muon": optim.MuonConfig, "adamw": optim.AdamWConfig}


def final_loss(module, make, scheme, optimizer, width, base_width, lrs, seed, steps, batch):
    """The held-out loss after `steps` steps at each LR of `lrs`, for one seed."""
    # fresh samples at every step (none seen twice: no memorizing), the same for every LR;
    # the held-out loss on 512 more
    x, y = module.data(steps * batch, seed=1000 + seed)
    x_val, y_val = module.data(512, seed=101)
    model, parametrization = parametrize(make, scheme=scheme, width=width,
                                         base_width=base_width, seed=seed)
    graphdef, state = nnx.split(model)
    tx = build_optimizer(optimizer(lr=1.0, warmup_steps=steps // 10), parametrization,
                         total_steps=steps)

    def loss_of(params, xb, yb):
        return module.loss_fn(nnx.merge(graphdef, params), xb, yb)

    @jax.jit
    def step(params, opt_state, lr, t):
        xb, yb = (jax.lax.dynamic_slice_in_dim(a, t * batch, batch) for a in (x, y))
        grads = jax.grad(loss_of)(params, xb, yb)
        updates, opt_state = tx.update(grads, opt_state, params)
        updates = jax.tree.map(lambda u: lr * u, updates)
        return optax.apply_updates(params, updates), opt_state

    evaluate = jax.jit(lambda params: loss_of(params, x_val, y_val))
    losses = []
    for lr in lrs:
        # a Python loop of one compiled step: XLA's CPU convolutions ran ~100x slower inside
        # a lax.scan body here
        params = state.to_pure_dict()
        opt_state = tx.init(params)
        for t in range(steps):
            params, opt_state = step(params, opt_state, lr, t)
        losses.append(float(evaluate(params)))
    return losses


def plot(paths: list[str], figure: str) -> None:
    """Held-out loss against log2 LR: a row per example, a column per result file (optimizer),
    SP dashed and μP solid, darker for wider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    runs = [json.loads(Path(p).read_text()) for p in paths]
    examples = list(dict.fromkeys(k.split("/")[0] for run in runs for k in run["results"]))
    fig, axes = plt.subplots(len(examples), len(runs), figsize=(4.2 * len(runs),
                                                                 3.2 * len(examples)),
                             squeeze=False)
    for col, run in enumerate(runs):
        widths = run["args"]["widths"]
        for row, name in enumerate(examples):
            ax = axes[row][col]
            for scheme, style in (("sp", "--"), ("mup", "-")):
                for i, width in enumerate(widths):
                    curve = run["results"].get(f"{name}/{scheme}/{width}")
                    if curve is None:
                        continue
                    shade = plt.cm.viridis(0.15 + 0.7 * i / max(1, len(widths) - 1))
                    ax.plot(curve["log2_lr"], curve["loss"], style, color=shade, marker=".",
                            label=f"{'μP' if scheme == 'mup' else 'SP'} w{width}")
                    ax.axvline(curve["optimum_log2_lr"], color=shade, ls=style, lw=0.6)
            ax.set_title(f"{name}, {run['args']['optimizer']}: drift SP "
                         f"{run['results'].get(f'{name}/sp/drift', float('nan')):+.2f}, μP "
                         f"{run['results'].get(f'{name}/mup/drift', float('nan')):+.2f}",
                         fontsize=9)
            ax.set_xlabel("log2 LR")
            ax.set_ylabel("held-out loss")
            ax.set_yscale("log")
            plain = FuncFormatter(lambda value, _: f"{value:g}")
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain)
            ax.tick_params(axis="y", which="minor", labelsize=6)
            ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    Path(figure).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=110)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", nargs="+", default=list(EXAMPLES), choices=EXAMPLES)
    parser.add_argument("--optimizer", default="muon", choices=OPTIMIZERS)
    parser.add_argument("--widths", nargs="+", type=int, default=[64, 128, 256])
    parser.add_argument("--log2-lrs", nargs="+", type=float,
                        default=[-10, -9, -8, -7, -6, -5, -4, -3, -2])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None,
                        help=f"steps per run (default per example: {STEPS})")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out", default="runs/any_model_transfer.json")
    parser.add_argument("--plot", nargs="+", metavar="RESULT_JSON",
                        help="draw these result files (a column each) instead of training")
    parser.add_argument("--figure", default="runs/any_model_transfer.png")
    args = parser.parse_args(argv)
    if args.plot:
        plot(args.plot, args.figure)
        return
    lrs = [2.0**e for e in args.log2_lrs]
    results = {}
    for name in args.examples:
        module, make = EXAMPLES[name]
        for scheme in ("sp", "mup"):
            optima = []
            for width in args.widths:
                start = time.time()
                losses = np.mean([final_loss(module, make, scheme, OPTIMIZERS[args.optimizer],
                                             width, args.widths[0], lrs, seed,
                                             args.steps or STEPS[name], args.batch)
                                  for seed in range(args.seeds)], axis=0)
                best = fit_optimum(args.log2_lrs, losses)
                optima.append(best.log2_lr)
                results[f"{name}/{scheme}/{width}"] = {
                    "log2_lr": args.log2_lrs, "loss": losses.tolist(),
                    "optimum_log2_lr": best.log2_lr, "on_edge": best.on_edge}
                print(f"{name} {scheme} w{width}: optimum log2 LR {best.log2_lr:+.2f}"
                      f"{' (edge)' if best.on_edge else ''}, loss {best.loss:.4f} "
                      f"({time.time() - start:.0f} s)", flush=True)
            slope = float(np.polyfit(np.log2(args.widths), optima, 1)[0])
            results[f"{name}/{scheme}/drift"] = slope
            print(f"{name} {scheme}: drift {slope:+.2f} octaves of LR per width doubling",
                  flush=True)
    write_json_atomic(Path(args.out), {"args": vars(args), "results": results})


if __name__ == "__main__":
    main()
