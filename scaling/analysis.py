"""Sweep analysis: the best LR per shape, its drift with width and depth, and power laws in
tokens/compute."""

from __future__ import annotations

import itertools
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from scaling.config import ConfigError
from scaling.files import read_jsonl
from scaling.fits import Optimum, fit_optimum, fit_power_law
from scaling.laws import LAWS, Size
from scaling.rules import TUNABLE
from scaling.shapes import (
    NOT_SHAPE,
    PROBE_FIELDS,
    config_id,
    family_of,
    multipliers,
    optim_label,
    probes,
    setting_label,
    shape_id,
    with_later_defaults,
)
from scaling.tuning import multiplier_drift, tune_lines, tunes

METRICS = ("val_loss", "train_loss")
# Two points fit any power law exactly: a third is the least that can disagree with the law.
MIN_POWER_LAW_POINTS = 3
# Nats per token above which a finite loss has blown up (a uniform guess over 100k tokens costs
# 11.5): counted as diverged, since one such point would swamp the quadratic fit. A run only
# flags a non-finite loss, and a blown-up MeZO run can stay finite (1e7 and more).
DIVERGED_LOSS = 100.0


def _outside_analysis(root: Path, path: Path) -> bool:
    """Whether `path` is a sweep's own file, not one under an `analysis` output folder."""
    return "analysis" not in path.relative_to(root).parts[:-1]


def load_results(sweep_dir: str | Path) -> list[dict]:
    """Every finished run's result.json under `sweep_dir`, sorted by run name; analysis outputs
    skipped, unfinished runs left to `unfinished_runs`."""
    root = Path(sweep_dir)
    paths = [p for p in root.rglob("result.json") if _outside_analysis(root, p)]
    if not paths:
        unfinished = len(unfinished_runs(root))
        found = (f"no run has finished yet ({unfinished} unfinished: a metrics log or "
                 "checkpoints, no result.json)") if unfinished else \
            "expected a sweep of run directories"
        raise FileNotFoundError(f"no result.json under {root}: {found}")
    return sorted((json.loads(p.read_text()) for p in paths), key=lambda r: r["name"])


def _checkpoint_step(run_dir: Path) -> int | None:
    """The newest checkpoint's step; orbax's temporary folders (`12.orbax-checkpoint-tmp-…`) are
    saves cut short, not checkpoints."""
    folder = run_dir / "checkpoints"
    steps = [int(p.name) for p in folder.iterdir() if p.name.isdigit() and p.is_dir()] \
        if folder.is_dir() else []
    return max(steps, default=None)


def unfinished_runs(sweep_dir: str | Path) -> list[dict]:
    """Run directories under `sweep_dir` with a metrics log or checkpoints but no result.json
    (still running, or killed), sorted by name: how far each got. A run's planned steps live in
    its config, which only result.json holds, so `steps` is None."""
    root = Path(sweep_dir)
    marks = [*root.rglob("metrics.jsonl"), *(p for p in root.rglob("checkpoints") if p.is_dir())]
    run_dirs = {p.parent for p in marks
                if _outside_analysis(root, p) and not (p.parent / "result.json").exists()}
    runs = []
    for run_dir in sorted(run_dirs, key=lambda d: d.name):
        records = read_jsonl(run_dir / "metrics.jsonl")
        runs.append({"name": run_dir.name, "run_dir": str(run_dir),
                     "logged_step": records[-1]["step"] if records else None,
                     "checkpoint_step": _checkpoint_step(run_dir), "steps": None})
    return runs


def _number(value) -> float | None:
    """A plain float for JSON, None for missing or non-finite."""
    return None if value is None or not math.isfinite(value) else float(value)


def _metric(result: dict, metric: str) -> float:
    """The run's loss; nan for a diverged run, and for a finite loss above DIVERGED_LOSS."""
    value = result.get(metric)
    if result["diverged"] or value is None or value > DIVERGED_LOSS:
        return math.nan
    return float(value)


def _model_label(model: dict) -> str:
    """ModelConfig.label of a result's model: its kind, or its factory function's name."""
    factory = model.get("factory")
    return model["kind"] if factory is None else factory.rpartition(":")[2]


def _run_row(result: dict) -> dict:
    cfg = result["config"]
    lr = cfg["optim"]["lr"]
    return {"name": result["name"], "param": cfg["param"]["name"], "optim": cfg["optim"]["name"],
            "kind": _model_label(cfg["model"]), "width": cfg["model"]["width"],
            "depth": cfg["model"]["depth"], "tokens": result["tokens"],
            "batch_size": cfg["train"]["batch_size"], "seed": cfg["train"]["seed"], "lr": lr,
            "log2_lr": math.log2(lr), "train_loss": _number(result.get("train_loss")),
            "val_loss": _number(result.get("val_loss")), "diverged": bool(result["diverged"]),
            "compute": float(result["flops_per_token"] * result["tokens"])}


def _curve_point(lr: float, values: list[float]) -> dict:
    finite = np.array([v for v in values if math.isfinite(v)])
    n = int(finite.size)
    return {"log2_lr": math.log2(lr), "lr": lr, "mean": float(finite.mean()) if n else None,
            "std": float(finite.std(ddof=1)) if n >= 2 else (0.0 if n else None), "n": n,
            "diverged": len(values) - n}


def _optimum_dict(optimum: Optimum) -> dict:
    return {"log2_lr": optimum.log2_lr, "lr": 2.0 ** optimum.log2_lr,
            "argmin_log2_lr": optimum.argmin_log2_lr, "loss": optimum.loss,
            "on_edge": optimum.on_edge, "fitted": optimum.fitted}


def _shape(sid: str, runs: list[dict], metric: str) -> dict:
    row = _run_row(runs[0])
    values = [(r["config"]["train"]["seed"], r["config"]["optim"]["lr"], _metric(r, metric))
              for r in runs]
    by_lr = defaultdict(list)
    for _, lr, value in values:
        by_lr[lr].append(value)
    curve = [_curve_point(lr, by_lr[lr]) for lr in sorted(by_lr)]
    means = [math.nan if p["mean"] is None else p["mean"] for p in curve]
    has_finite = any(math.isfinite(m) for m in means)
    seeds = sorted({seed for seed, _, _ in values})
    seed_optima = []
    for seed in seeds:
        lrs, losses = zip(*[(math.log2(lr), v) for s, lr, v in values if s == seed])
        if any(math.isfinite(v) for v in losses):
            seed_optima.append(fit_optimum(lrs, losses).log2_lr)
    probe_scaling = probes(runs[0]["config"]["optim"])
    return {"id": sid, "param": row["param"], "optim": row["optim"],
            **({} if probe_scaling is None else {"probes": probe_scaling}),
            "kind": row["kind"], "width": row["width"], "depth": row["depth"],
            "tokens": row["tokens"], "batch_size": row["batch_size"], "steps": runs[0]["config"]["train"]["steps"],
            "multipliers": multipliers(runs[0]["config"]),
            "adam_lr": runs[0]["config"]["optim"].get("adam_lr"), "seeds": seeds, "curve": curve,
            "optimum": _optimum_dict(fit_optimum([p["log2_lr"] for p in curve], means))
            if has_finite else None,
            "seed_optima": seed_optima,
            "log2_lr_mean": float(np.mean(seed_optima)) if seed_optima else None,
            "log2_lr_std": float(np.std(seed_optima, ddof=1)) if len(seed_optima) >= 2 else 0.0,
            "compute": row["compute"],
            "best_loss": float(np.nanmin(means)) if has_finite else None}


# Config fields a shape shows apart (its sizes, recipe and tuned values); any other field that
# differs between the shapes of one recipe is listed in their `setting`.
SHOWN_FIELDS = ("param.name", "optim.name", "model.kind", "model.width", "model.depth",
                "train.steps", "train.batch_size", "train.seq_len", "optim.adam_lr",
                *(f"param.{field}" for field in TUNABLE), *(f"optim.{f}" for f in PROBE_FIELDS))


def _flat(config: dict) -> dict[str, str]:
    return {f"{group}.{key}": json.dumps(value, sort_keys=True)
            for group, values in config.items() if isinstance(values, dict)
            for key, value in values.items()}


def _add_settings(shapes: list[tuple[dict, dict]]) -> None:
    """Each shape's `setting`: the config fields (not shown otherwise) whose values differ
    among the shapes of its recipe (param, optimizer), e.g. data.tokenizer in a sweep of bytes
    and BPE runs; {} in a sweep that varies only sizes, LR and tuned values."""
    hidden = set(NOT_SHAPE) | set(SHOWN_FIELDS)
    by_recipe = defaultdict(list)
    for shape, config in shapes:
        by_recipe[shape["param"], optim_label(shape)].append(
            (shape, _flat(with_later_defaults(config))))
    for members in by_recipe.values():
        keys = sorted({k for _, flat in members for k in flat if k not in hidden
                       and not any(k.startswith(f"{h}.") for h in hidden)})
        varying = [k for k in keys if len({flat.get(k) for _, flat in members}) > 1]
        for shape, flat in members:
            shape["setting"] = {k: json.loads(flat[k]) if k in flat else None for k in varying}


def _families(shapes: list[tuple[dict, dict]], vary: tuple[str, ...]) -> list[list[dict]]:
    """Shapes with an optimum, grouped by everything in their config except the `vary` fields."""
    groups = defaultdict(list)
    for shape, config in shapes:
        if shape["optimum"] is not None:
            groups[config_id(config, NOT_SHAPE + vary)].append(shape)
    return list(groups.values())


def _sem(std: float | None, n: int) -> float | None:
    """Standard error of a seed mean; unknown (None) from fewer than 2 seeds."""
    return std / math.sqrt(n) if std is not None and n >= 2 else None


# What a drift family varies ("width" or "depth") -> the shape fields it holds fixed.
DRIFT_AXES = {"width": ("param", "optim", "kind", "depth", "tokens", "batch_size"),
              "depth": ("param", "optim", "kind", "width", "tokens", "batch_size")}
PATH_FIELDS = ("param", "optim", "kind", "batch_size")  # width, depth and steps move together
# The analysis's keys per axis, (drift, bigger is better): width's names predate depth's.
DRIFT_KEYS = {"width": ("drift", "wider_is_better"), "depth": ("depth_drift", "deeper_is_better")}


def _drift(family: list[dict], axis: str) -> dict:
    """How the optimum moves along `axis` over shapes equal in every other field."""
    log2_lr = [s["optimum"]["log2_lr"] for s in family]
    hi, lo = int(np.argmax(log2_lr)), int(np.argmin(log2_lr))
    sems = [_sem(family[i]["log2_lr_std"], len(family[i]["seed_optima"])) for i in (hi, lo)]
    sizes = [s[axis] for s in family]
    first = family[0]
    return {"family": family_of(first, DRIFT_AXES[axis]),
            f"{axis}s": sizes, "log2_lr": log2_lr,
            "log2_lr_std": [s["log2_lr_std"] for s in family],
            "n_seeds": [len(s["seed_optima"]) for s in family],  # behind each std; 1: no spread
            "drift_octaves": log2_lr[hi] - log2_lr[lo],
            "drift_uncertainty": math.hypot(*sems) if None not in sems else None,
            "slope": float(np.polyfit(np.log2(sizes), log2_lr, 1)[0]),  # octaves per doubling
            "any_on_edge": any(s["optimum"]["on_edge"] for s in family)}


def _bigger_is_better(family: list[dict], drift: dict, axis: str) -> dict:
    """Loss per size at the grid LR nearest the smallest shape's optimum (the transferred LR)."""
    smallest = family[0]
    log2_lr = min((p["log2_lr"] for p in smallest["curve"]),
                  key=lambda g: abs(g - smallest["optimum"]["log2_lr"]))
    points = [next((p for p in s["curve"] if math.isclose(p["log2_lr"], log2_lr, abs_tol=1e-9)),
                   None) for s in family]
    means = [p and p["mean"] for p in points]
    sems = [_sem(p["std"], p["n"]) if p else None for p in points]
    holds = None not in means and all(b < a for a, b in itertools.pairwise(means))
    thresholds = ([2 * math.hypot(a, b) for a, b in itertools.pairwise(sems)]
                  if None not in sems else None)
    beyond_noise = holds and thresholds is not None and all(
        a - b > t for (a, b), t in zip(itertools.pairwise(means), thresholds))
    return {"family": drift["family"], "log2_lr": log2_lr, f"{axis}s": drift[f"{axis}s"],
            "loss_mean": means, "loss_sem": sems, "holds": holds, "beyond_noise": beyond_noise,
            "noise": max(thresholds) if thresholds else None}


def _drifts(shapes: list[tuple[dict, dict]], axis: str) -> tuple[list[dict], list[dict]]:
    """(drift, bigger-is-better) per family of ≥ 2 shapes that differ only in `axis`."""
    drift, bigger = [], []
    for family in _families(shapes, (f"model.{axis}",)):
        if len(family) >= 2:
            family.sort(key=lambda s: s[axis])
            drift.append(_drift(family, axis))
            bigger.append(_bigger_is_better(family, drift[-1], axis))
    return drift, bigger


def _paths(shapes: list[tuple[dict, dict]]) -> list[dict]:
    """Drift along each joint width–depth path: shapes equal in all but width and depth, where
    both grow together (each width one depth, deeper as wider), as a sweep that scales width and
    depth at once (and tokens, if the steps grow along it). The optimum's drift per width doubling as measured, and what is left of it
    once each LR law's prediction (scaling/laws.py) is taken out."""
    paths = []
    for family in _families(shapes, ("model.width", "model.depth", "train.steps")):
        family.sort(key=lambda s: s["width"])
        widths, depths = [s["width"] for s in family], [s["depth"] for s in family]
        if len(family) < 2 or not (all(a < b for a, b in itertools.pairwise(widths))
                                   and all(a < b for a, b in itertools.pairwise(depths))):
            continue
        measured = _drift(family, "width")
        first = _size(family[0])
        residuals = {}
        for law in LAWS.values():
            predicted = [family[0]["optimum"]["log2_lr"] + law.log2_factor(first, _size(s))
                         for s in family]
            left = [m - p for m, p in zip(measured["log2_lr"], predicted, strict=True)]
            residuals[law.name] = {
                "predicted_log2_lr": predicted, "residual": left,
                "drift_octaves": max(left) - min(left),
                "slope": float(np.polyfit(np.log2(widths), left, 1)[0])}
        paths.append({**measured, "family": family_of(family[0], PATH_FIELDS),
                      "depths": depths, "laws": residuals})
    return paths


def _size(shape: dict) -> Size:
    return Size(shape["width"], shape["depth"], shape["tokens"], shape["batch_size"])


def _power_law(x: list[float], y: list[float]) -> dict:
    """The fitted law, or null numbers and `fitted: false` below MIN_POWER_LAW_POINTS x values."""
    points = len(set(x))
    if points < MIN_POWER_LAW_POINTS:
        return {"exponent": None, "exponent_stderr": None, "coefficient": None, "fitted": False,
                "points": points}
    fit = fit_power_law(x, y)
    return {"exponent": fit.exponent, "exponent_stderr": _number(fit.exponent_stderr),
            "coefficient": fit.coefficient, "fitted": True, "points": points}


def exponent_text(law: dict) -> str:
    """The exponent ± its standard error, or why there is none ("not fitted: 2 points")."""
    if not law["fitted"]:
        return f"not fitted: {law['points']} points"
    return f"{law['exponent']:.3f} ± {_pm(law['exponent_stderr'], 3)}"


def analyze(results: list[dict], metric: str = "val_loss",
            unfinished: list[dict] | None = None) -> dict:
    """Per-shape LR optima and, across shapes, drift with width and with depth and power laws
    (JSON-ready); `unfinished` (from `unfinished_runs`) is passed through, so a partial sweep's
    analysis says what it is missing."""
    if metric not in METRICS:
        raise ConfigError("metric", metric, f"one of {list(METRICS)}")
    groups = {r["config"].get("logging", {}).get("group") for r in results}
    runs_by_shape = defaultdict(list)
    for result in results:
        runs_by_shape[shape_id(result["config"])].append(result)
    shapes = sorted(((_shape(sid, runs, metric), runs[0]["config"])
                     for sid, runs in runs_by_shape.items()),
                    key=lambda sc: (*(sc[0][k] for k in ("param", "optim", "kind", "depth",
                                                         "tokens", "width")),
                                    setting_label(sc[0]), sc[0]["id"]))
    _add_settings(shapes)
    drifts = {}
    for axis, (drift_key, bigger_key) in DRIFT_KEYS.items():
        drifts[drift_key], drifts[bigger_key] = _drifts(shapes, axis)
    drifts["path_drift"] = _paths(shapes)
    lr_vs_tokens = []
    for family in _families(shapes, ("train.steps", "train.batch_size")):
        family.sort(key=lambda s: s["tokens"])
        tokens = [s["tokens"] for s in family]
        if len(set(tokens)) >= 2:
            log2_lr = [s["optimum"]["log2_lr"] for s in family]
            lr_vs_tokens.append({"family": family_of(family[0], ("param", "optim", "kind",
                                                                   "width", "depth")),
                                 "tokens": tokens, "log2_lr": log2_lr,
                                 **_power_law(tokens, [2.0 ** v for v in log2_lr])})
    by_recipe = defaultdict(list)
    for shape, _ in shapes:
        if shape["best_loss"] is not None:
            by_recipe[shape["param"], shape["optim"], shape.get("probes", ""),
                      setting_label(shape)].append(shape)
    loss_vs_compute = []
    for (*_, tuned), family in sorted(by_recipe.items()):
        family.sort(key=lambda s: s["compute"])
        compute, loss = [s["compute"] for s in family], [s["best_loss"] for s in family]
        if len(set(compute)) >= 2:
            loss_vs_compute.append({**family_of(family[0], ("param", "optim")),
                                    **({"tuned": tuned} if tuned else {}),
                                    "compute": compute, "loss": loss,
                                    **_power_law(compute, loss)})
    multiplier_tunes = tunes(shapes)
    return {"metric": metric, "group": groups.pop() if len(groups) == 1 else None,
            "runs": sorted((_run_row(r) for r in results), key=lambda row: row["name"]),
            "shapes": [shape for shape, _ in shapes], **drifts, "lr_vs_tokens": lr_vs_tokens,
            "loss_vs_compute": loss_vs_compute, "tunes": multiplier_tunes,
            "multiplier_drift": multiplier_drift(multiplier_tunes), "unfinished": unfinished or []}


def _pm(value: float | None, digits: int = 2) -> str:
    return "?" if value is None else f"{value:.{digits}f}"


def _recipe(family: dict) -> str:
    """'hyperp muonh', with the family's absolute Adam LR where it has one."""
    adam = f" adam_lr={family['adam_lr']:g}" if "adam_lr" in family else ""
    setting = "".join(f" {k}={v}" for k, v in family.get("setting", {}).items())
    return f"{family['param']} {optim_label(family)}{adam}{setting}"


def _drift_lines(analysis: dict, axis: str) -> list[str]:
    """One line per drift family along `axis`, then one per bigger-is-better check; the family
    is named by the other axis, which it holds fixed ("d2" for width drift, "w64" for depth)."""
    sizes, letter = f"{axis}s", axis[0]
    (fixed,) = {"width", "depth"} - {axis}
    drift_key, bigger_key = DRIFT_KEYS[axis]
    bigger = bigger_key.split("_")[0]  # wider, deeper
    lines = []
    for d in analysis[drift_key]:
        f = d["family"]
        edge = "  (an optimum is on the grid edge)" if d["any_on_edge"] else ""
        lines.append(f"{_recipe(f)} {fixed[0]}{f[fixed]} {f['tokens']} tokens "
                     f"{letter}{d[sizes][0]}→{letter}{d[sizes][-1]}: drift "
                     f"{d['drift_octaves']:.2f} ± {_pm(d['drift_uncertainty'])} octaves, "
                     f"slope {d['slope']:+.2f}/{axis}-octave" + edge)
    for b in analysis[bigger_key]:
        f = b["family"]
        lines.append(f"{_recipe(f)} {fixed[0]}{f[fixed]} {f['tokens']} tokens at "
                     f"log2 lr {b['log2_lr']:.2f}: {bigger} is better "
                     f"{'yes' if b['holds'] else 'no'}, beyond noise "
                     f"{'yes' if b['beyond_noise'] else 'no'} (noise {_pm(b['noise'], 4)})")
    return lines


def format_table(analysis: dict) -> str:
    """Plain-text summary: one line per shape, then drift and bigger-is-better along width and
    along depth, and power laws."""
    # as wide as the longest optimizer label ('mezo[matched]'), at least 6 as before
    optim_width = max([6, *(len(optim_label(s)) for s in analysis["shapes"])])
    lines = [f"metric: {analysis['metric']}   group: {analysis['group']}",
             (f"{'param':<9} {'optim':<{optim_width}} {'kind':<11} {'width':>6} {'depth':>5} "
              f"{'tokens':>11} {'seeds':>5}  {'log2 lr ± std':>14} {'argmin':>7}  "
              f"{'best loss':>9}")]
    for s in analysis["shapes"]:
        head = (f"{s['param']:<9} {optim_label(s):<{optim_width}} {s['kind']:<11} {s['width']:>6} "
                f"{s['depth']:>5} {s['tokens']:>11} {len(s['seeds']):>5}  ")
        o = s["optimum"]
        if o is None:
            lines.append(head + "every run diverged")
            continue
        edge = "*" if o["on_edge"] else " "
        tuned = " ".join(part for part in (setting_label(s), *(
            f"{k}={v}" for k, v in s.get("setting", {}).items())) if part)
        # n/a: no parabola through < 3 LRs around the best, no spread from < 2 seeds
        log2_lr = f"{o['log2_lr']:>7.2f}" if o["fitted"] else f"{'n/a':>7}"
        std = f"{s['log2_lr_std']:<4.2f}" if len(s["seed_optima"]) >= 2 else "n/a "
        lines.append(head + f"{log2_lr} ± {std} {o['argmin_log2_lr']:>7.2f}{edge} "
                     f"{s['best_loss']:>9.4f}" + (f"  {tuned}" if tuned else ""))
    if any(s["optimum"] is not None and s["optimum"]["on_edge"] for s in analysis["shapes"]):
        lines.append("(* optimum at the edge of the LR grid: the true optimum may lie outside it)")
    lines += [line for axis in DRIFT_KEYS for line in _drift_lines(analysis, axis)]
    lines += _path_lines(analysis.get("path_drift", []))
    lines += tune_lines(analysis)
    for p in analysis["lr_vs_tokens"]:
        f = p["family"]
        lines.append(f"{f['param']} {optim_label(f)} w{f['width']} d{f['depth']}: optimal lr ∝ "
                     f"tokens^({exponent_text(p)})")
    for p in analysis["loss_vs_compute"]:
        tuned = f" {p['tuned']}" if p.get("tuned") else ""
        lines.append(f"{p['param']} {optim_label(p)}{tuned}: best loss ∝ "
                     f"compute^({exponent_text(p)})")
    lines += _unfinished_lines(analysis["unfinished"])
    return "\n".join(lines)


def _path_lines(paths: list[dict]) -> list[str]:
    """One line per joint width–depth path: its drift as measured, then after each law."""
    lines = []
    for d in paths:
        steps = "→".join(f"w{w}d{depth}" for w, depth in zip(d["widths"], d["depths"],
                                                                strict=True))
        edge = "  (an optimum is on the grid edge)" if d["any_on_edge"] else ""
        left = ", ".join(f"{name} {r['slope']:+.2f}" for name, r in d["laws"].items())
        lines.append(f"{_recipe(d['family'])} path {steps}: drift {d['drift_octaves']:.2f} ± "
                     f"{_pm(d['drift_uncertainty'])} octaves, slope {d['slope']:+.2f}/width-octave;"
                     f" slope left after each law: {left}{edge}")
    return lines


def _unfinished_lines(unfinished: list[dict]) -> list[str]:
    """One line per unfinished run and their count; none when every run finished."""
    if not unfinished:
        return []
    lines = [f"unfinished: {u['name']} (step {_step(u['logged_step'])} logged, checkpoint at "
             f"{_step(u['checkpoint_step'])})" for u in unfinished]
    return [*lines, f"unfinished runs left out of the analysis: {len(unfinished)}"]


def _step(step: int | None) -> str:
    return "none" if step is None else str(step)
