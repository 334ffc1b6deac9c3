"""`scaling-transfer SWEEP_DIR [--width W] [--depth L]`: the target's hyperparameters from a sweep.

Prints the reasoning (which rule moved which number), writes the target's Hydra overrides as a
YAML list (the format of Hydra's own overrides.yaml) and, with --launch, trains the target.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shlex
from pathlib import Path
from typing import NoReturn

from experiments.cli import OneLineParser, fail
from experiments.compose import compose, group_options, to_run_config
from scaling.analysis import load_results
from scaling.config import RunConfig, to_dict
from scaling.files import atomic_open
from scaling.laws import DATA_EXPONENT, LAWS
from scaling.transfer import TransferResult, transfer_from_sweep

# Groups whose option is chosen by name; every other difference is a field override.
GROUP_FIELDS = {"model": "kind", "param": "name", "optim": "name"}
# the mesh is where the proxy ran, not what it trained: the target's is chosen with --mesh
NOT_OVERRIDDEN = ("logging", "sweep", "mesh")
# What the target may change, as (flag, model or train field): at least one must move.
TARGET_FLAGS = (("--width", "model.width"), ("--depth", "model.depth"),
                ("--steps", "train.steps"), ("--batch-size", "train.batch_size"))


def _fail(message: str) -> NoReturn:
    fail("scaling-transfer", message)



def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="scaling-transfer", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="the proxy sweep's folder")
    parser.add_argument("--width", type=int, help="the target's model.width (default: proxy's)")
    parser.add_argument("--depth", type=int, help="the target's model.depth (default: proxy's)")
    parser.add_argument("--steps", type=int, help="the target's train.steps (default: proxy's)")
    parser.add_argument("--batch-size", type=int, help="train.batch_size (default: proxy's)")
    parser.add_argument("--param", help="which parametrization's sweep to transfer from")
    parser.add_argument("--optim", help="which optimizer's sweep, where it holds several "
                        "(as the analysis tables name it: adamw, mezo[matched], …)")
    parser.add_argument("--proxy-width", type=int, help="default: widest interior optimum")
    parser.add_argument("--proxy-depth", type=int,
                        help="default: deepest interior optimum at the proxy width")
    parser.add_argument("--law", choices=list(LAWS), help="the base-LR law (default: the "
                        "parametrization's own): " + "; ".join(f"{law.name}: {law.description}"
                                                               for law in LAWS.values()))
    parser.add_argument("--data-exponent", type=float,
                        help=f"k in η ∝ T^(−k) (default: the law's, {DATA_EXPONENT} as HyperP)")
    parser.add_argument("--depth-exponent", type=float,
                        help="d in η ∝ (L0/L)^d (default: the law's; an assumption to measure)")
    parser.add_argument("--width-exponent", type=float,
                        help="a in η ∝ (w0/w)^a (default: the law's)")
    parser.add_argument("--out-dir", default="runs/transfer", help="train.out_dir of the target")
    parser.add_argument("--out", type=Path, help="overrides file (default: "
                        "SWEEP_DIR/analysis/transfer-PARAM-wW-dL.yaml)")
    parser.add_argument("--launch", action="store_true", help="train the target now")
    parser.add_argument("--mesh", choices=group_options("mesh"), default="single",
                        help="the target's mesh (docs/sharding.md), e.g. fsdp: sharded over "
                        "every device (default: single)")
    return parser


def command_overrides(target: RunConfig) -> list[str]:
    """Overrides that make `scaling-train` train `target` (composing them gives it back)."""
    groups = [f"{group}={getattr(getattr(target, group), field)}"
              for group, field in GROUP_FIELDS.items()]
    base, wanted = to_dict(to_run_config(compose(groups))), to_dict(target)
    fields = [f"{group}.{key}={_value(value)}"
              for group, values in wanted.items() if group not in NOT_OVERRIDDEN
              for key, value in values.items() if base[group][key] != value]
    group = [f"logging.group={_value(target.logging.group)}"] if target.logging.group else []
    return groups + fields + group  # the group: a target logs beside its proxy sweep in W&B


def _value(value) -> str:
    # quoted, or Hydra would read a folder named "2024" or "true" as a number or a bool
    return "null" if value is None else json.dumps(value) if isinstance(value, str) else str(value)


def plan(sweep_dir: Path, *, width: int | None = None, depth: int | None = None,
         steps: int | None = None, batch_size: int | None = None, param: str | None = None,
         proxy_width: int | None = None, proxy_depth: int | None = None,
         law: str | None = None, data_exponent: float | None = None,
         depth_exponent: float | None = None, width_exponent: float | None = None,
         optim: str | None = None) -> tuple[dict, TransferResult]:
    """(proxy shape, transfer) from the sweep's results; the target logs to the sweep's group."""
    return transfer_from_sweep(load_results(sweep_dir), width=width, depth=depth, steps=steps,
                               batch_size=batch_size, param=param, proxy_width=proxy_width,
                               proxy_depth=proxy_depth, law=law, data_exponent=data_exponent,
                               depth_exponent=depth_exponent, width_exponent=width_exponent,
                               optim=optim)


def explain(shape: dict, result: TransferResult) -> str:
    optimum = shape["optimum"]
    edge = ", ON THE GRID EDGE: widen the LR grid" if optimum["on_edge"] else ""
    lines = [(f"proxy: {shape['param']} {shape['kind']} w{shape['width']} d{shape['depth']}, "
              f"{shape['tokens']:,} tokens, seeds {shape['seeds']}: fitted log2 LR "
              f"{optimum['log2_lr']:.2f} ± {shape['log2_lr_std']:.2f} "
              f"(grid argmin {optimum['argmin_log2_lr']:.2f}{edge})")]
    lines += [f"  {reason}" for reason in result.reasons]
    lines.append("  per-group LR (base η × multiplier), proxy → target:")
    proxy_lr = optimum["lr"]
    pad = max(7, *map(len, result.role_multipliers))  # group labels such as "hidden.block"
    for group, (before, after) in sorted(result.role_multipliers.items()):
        lines.append(f"    {group:<{pad}} ×{before:<8.4g} → ×{after:<8.4g}"
                     f"  η {proxy_lr * before:.4g} → {result.lr * after:.4g}")
    return "\n".join(lines)


def write_overrides(path: Path, overrides: list[str], reasons: list[str]) -> None:
    """A YAML list of overrides (Hydra's overrides.yaml format), the reasoning as comments."""
    with atomic_open(path) as f:
        f.write("".join(f"# {r}\n" for r in reasons))
        f.write("".join(f"- {json.dumps(o)}\n" for o in overrides))


def _require_a_change(shape: dict, target: RunConfig) -> None:
    """A target the same shape as its proxy is no transfer: say which flags would make one."""
    proxy = {"model.width": shape["width"], "model.depth": shape["depth"],
             "train.steps": shape["steps"], "train.batch_size": shape["batch_size"]}
    if all(_field(target, field) == proxy[field] for _, field in TARGET_FLAGS):
        now = ", ".join(f"{flag} {proxy[field]}" for flag, field in TARGET_FLAGS)
        _fail(f"nothing to transfer: the target equals the proxy ({now}); expected at least one "
              f"of {', '.join(flag for flag, _ in TARGET_FLAGS)} to differ")


def _field(cfg: RunConfig, dotted: str):
    group, name = dotted.split(".")
    return getattr(getattr(cfg, group), name)


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if not args.sweep_dir.is_dir():
        _fail(f"sweep_dir={str(args.sweep_dir)!r}: expected an existing folder of sweep runs")
    try:
        shape, result = plan(args.sweep_dir, width=args.width, depth=args.depth, steps=args.steps,
                             batch_size=args.batch_size, param=args.param,
                             proxy_width=args.proxy_width, proxy_depth=args.proxy_depth,
                             law=args.law, data_exponent=args.data_exponent,
                             depth_exponent=args.depth_exponent,
                             width_exponent=args.width_exponent,
                             optim=args.optim)
    except (FileNotFoundError, ValueError) as error:  # ConfigError is a ValueError
        _fail(str(error))
    target = dataclasses.replace(result.config, train=dataclasses.replace(
        result.config.train, out_dir=args.out_dir),
        mesh=to_run_config(compose([f"mesh={args.mesh}"])).mesh)
    _require_a_change(shape, target)
    overrides = command_overrides(target) + ([f"mesh={args.mesh}"] if args.mesh != "single" else [])
    model = target.model
    # the optimizer in the name only when chosen, so a one-optimizer sweep's file keeps its name
    recipe = shape["param"] + (f"-{re.sub(r'[^a-z0-9]+', '-', args.optim).strip('-')}"
                               if args.optim else "")
    out = args.out or (args.sweep_dir / "analysis"
                       / f"transfer-{recipe}-w{model.width}-d{model.depth}.yaml")
    write_overrides(out, overrides, result.reasons)
    print(explain(shape, result))
    print(f"wrote {out}\nrun it: scaling-train {shlex.join(overrides)}")
    if args.launch:
        from scaling.training.loop import train  # importing jax is the slow part

        run = train(target)
        print(f"{run['run_dir']}: val_loss={run['val_loss']} diverged={run['diverged']}")


if __name__ == "__main__":
    main()
