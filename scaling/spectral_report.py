"""Top singular values of finished runs: two runs compared matrix by matrix (a proxy against its
target), and a width sweep's σ growth per role under each hidden weight-decay exponent γ
(λ ∝ m^γ, docs/rules.md: weight decay), with the decay each run accumulated (ηλ·steps).

σ comes from a run's `spectral.jsonl` (its last row) when the run logged one, else from its last
checkpoint by power iteration (scaling/spectral.py), iterated until it stops moving. Matrices are
named as the log names them: the parameter path, and `/<i>` per layer of a stacked leaf.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections import defaultdict
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from matplotlib.figure import Figure
from matplotlib.patches import Patch

import optim
from models.config import ModelConfig
from models.tagged import ParamSpec
from scaling.config import (
    ConfigError,
    DataConfig,
    ParamConfig,
    RunConfig,
    from_dict,
)
from scaling.files import atomic_open
from scaling.log_axes import label_log_axis, span_log_y
from scaling.parametrization import make_parametrization
from scaling.spectral import init_vectors, matrix_paths, sigma_names, top_singular_values

SPECTRAL_LOG = "spectral.jsonl"
# power iteration from the checkpoint: calls of ITERATIONS each until σ moves less than TOLERANCE
ITERATIONS, MAX_CALLS, TOLERANCE = 32, 64, 1e-5
ROLE_ORDER = ("input", "hidden", "output")
DPI = 100


@dataclasses.dataclass(frozen=True)
class RunSpectrum:
    """σ_max of every matrix of one finished run, and where it was read."""

    run_dir: Path
    config: RunConfig
    sigma: dict[str, float]  # matrix name -> σ_max
    roles: dict[str, str]  # matrix name -> role
    source: str  # SPECTRAL_LOG or "checkpoint"


@functools.cache
def _parametrization(model: ModelConfig, param: ParamConfig, data_cfg: DataConfig):
    """A run's parametrization, built abstractly once per shape (a sweep repeats a few)."""
    return make_parametrization(model, param, data_cfg.source_vocab_size)


def _finished_result(run_dir: Path, field: str) -> dict:
    if not run_dir.is_dir():
        raise ConfigError(field, str(run_dir), "an existing run directory")
    result_file = run_dir / "result.json"
    if not result_file.is_file():
        raise ConfigError(field, str(run_dir), "a finished run: it has no result.json (still "
                          "training, stopped early, or not a run directory)")
    result = json.loads(result_file.read_text())
    if result.get("diverged"):
        raise ConfigError(field, str(run_dir), "a run that did not diverge")
    return result


def checkpoint_params(run_dir: Path, field: str = "run") -> dict:
    """The parameters of the run's newest checkpoint, read as saved: no train-state template, so
    a checkpoint written by any version of the train state reads the same."""
    manager = ocp.CheckpointManager((run_dir / "checkpoints").absolute())
    try:
        step = manager.latest_step()
        if step is None:
            raise ConfigError(field, str(run_dir), "a run with a checkpoint in checkpoints/")
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore()))
    finally:
        manager.close()
    return restored["state"]["params"]


def checkpoint_sigmas(run_dir: Path, specs: dict[tuple, ParamSpec], field: str = "run"
                      ) -> dict[str, float]:
    """σ_max of every matrix in the run's last checkpoint, by power iteration to TOLERANCE."""
    params = checkpoint_params(run_dir, field)
    step = jax.jit(lambda p, v: top_singular_values(p, specs, v, ITERATIONS))
    vectors, previous = init_vectors(params, specs), None
    for _ in range(MAX_CALLS):
        sigmas, vectors = step(params, vectors)
        sigmas = jax.device_get(sigmas)
        if previous is not None and all(
                np.all(np.abs(sigmas[p] - previous[p]) <= TOLERANCE * sigmas[p]) for p in sigmas):
            break
        previous = sigmas
    return {name: float(value) for path in matrix_paths(specs)
            for name, value in zip(sigma_names(path, specs[path]), sigmas[path], strict=True)}


def load_run(run_dir: str | Path, field: str = "run") -> RunSpectrum:
    """A finished run's σ_max per matrix; `field` names the run in errors."""
    run_dir = Path(run_dir)
    result = _finished_result(run_dir, field)
    cfg = from_dict(result["config"])
    specs = _parametrization(cfg.model, cfg.param, cfg.data).specs
    roles = {name: specs[path].role for path in matrix_paths(specs)
             for name in sigma_names(path, specs[path])}
    log = run_dir / SPECTRAL_LOG
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] \
        if log.is_file() else []
    if rows:
        sigma, source = rows[-1]["sigma"], SPECTRAL_LOG
        unknown = sorted(set(sigma) - set(roles))
        if unknown:
            raise ConfigError(field, str(run_dir), f"a {SPECTRAL_LOG} naming this model's "
                              f"matrices (it names {unknown[:3]})")
    elif (run_dir / "checkpoints").is_dir():
        sigma, source = checkpoint_sigmas(run_dir, specs, field), "checkpoint"
    else:
        raise ConfigError(field, str(run_dir), f"a run with checkpoints/ or {SPECTRAL_LOG}")
    return RunSpectrum(run_dir, cfg, {n: sigma[n] for n in roles if n in sigma}, roles, source)


def compare_runs(a: RunSpectrum, b: RunSpectrum) -> list[dict]:
    """One row per matrix of either run: σ_max of each and their ratio b / a (None where a
    matrix is missing from one run, e.g. runs of different depths)."""
    names = list(a.sigma) + [n for n in b.sigma if n not in a.sigma]
    rows = []
    for name in names:
        sigma_a, sigma_b = a.sigma.get(name), b.sigma.get(name)
        rows.append({"matrix": name, "role": a.roles.get(name) or b.roles.get(name),
                     "sigma_a": sigma_a, "sigma_b": sigma_b,
                     "ratio": None if sigma_a is None or sigma_b is None else sigma_b / sigma_a})
    return rows


def _fmt(value: float | None, spec: str = ".4g") -> str:
    return "—" if value is None else format(value, spec)


def format_comparison(rows: list[dict], label_a: str, label_b: str) -> str:
    """The comparison as an aligned text table, ending with the geometric-mean ratio per role."""
    width = max(len("matrix"), *(len(r["matrix"]) for r in rows))
    lines = [f"A = {label_a}", f"B = {label_b}",
             f"{'matrix':<{width}}  {'role':<7}  {'σ A':>9}  {'σ B':>9}  {'B/A':>7}"]
    for r in rows:
        lines.append(f"{r['matrix']:<{width}}  {r['role']:<7}  {_fmt(r['sigma_a']):>9}  "
                     f"{_fmt(r['sigma_b']):>9}  {_fmt(r['ratio'], '.3f'):>7}")
    for role, ratio in role_ratios(rows).items():
        lines.append(f"{role}: B/A geometric mean {ratio:.3f}")
    return "\n".join(lines)


def role_ratios(rows: list[dict]) -> dict[str, float]:
    """Geometric mean of the B/A ratio over each role's matrices present in both runs."""
    by_role = defaultdict(list)
    for r in rows:
        if r["ratio"] is not None:
            by_role[r["role"]].append(math.log(r["ratio"]))
    return {role: math.exp(np.mean(by_role[role])) for role in _ordered(by_role)}


def _ordered(roles) -> list[str]:
    return sorted(roles, key=lambda r: (ROLE_ORDER.index(r) if r in ROLE_ORDER else 9, r))


# ---- a width sweep under several weight-decay exponents -------------------------------------

def _family_key(config: dict) -> str:
    """Everything a run trains but its width and seed: runs that differ only in those."""
    values = json.loads(json.dumps(config))
    values["model"].pop("width")
    values["train"].pop("seed")
    values["train"].pop("out_dir")
    for group in ("logging", "sweep"):
        values.pop(group, None)
    return json.dumps(values, sort_keys=True)


def hidden_decay(cfg: RunConfig) -> dict[str, float]:
    """The hidden matrices' LR-coupled decay over the run: ηλ·steps at the peak LR, and Σ_t η_tλ
    over the schedule actually trained (the warmup and any decay phase lower it)."""
    multipliers = _parametrization(cfg.model, cfg.param, cfg.data).optimizer_multipliers(
        cfg.optim)
    hidden = {label: m for label, m in multipliers.items() if optim.role_of(label) == "hidden"}
    mult = next(iter(hidden.values()))
    decay = cfg.optim.weight_decay * mult.weight_decay
    schedule = optim.learning_rate(cfg.optim, cfg.train.steps, mult.lr)
    integrated = float(np.sum(schedule(np.arange(cfg.train.steps)))) * decay
    return {"eta_lambda_steps": cfg.optim.lr * mult.lr * decay * cfg.train.steps,
            "integrated": integrated, "eta": cfg.optim.lr * mult.lr, "lambda": decay}


def _family_label(cfg: RunConfig) -> str:
    gamma = cfg.optim.wd_width_exponent
    return (f"{cfg.param.name} {cfg.optim.name} γ={'table' if gamma is None else f'{gamma:g}'} "
            f"λ={cfg.optim.weight_decay:g} lr={cfg.optim.lr:.3g}")


def sweep_report(sweep_dir: str | Path) -> dict:
    """Per family of runs that differ only in width and seed: σ_max per role at each width
    (geometric mean over the role's matrices and the seeds), its ratio from the narrowest to the
    widest width and that ratio per width doubling, and the hidden decay per width."""
    root = Path(sweep_dir)
    if not root.is_dir():
        raise ConfigError("sweep_dir", str(root), "an existing folder of runs")
    run_dirs = sorted(p.parent for p in root.rglob("result.json")
                      if "analysis" not in p.relative_to(root).parts[:-1])
    if not run_dirs:
        raise ConfigError("sweep_dir", str(root), "a folder holding finished runs (result.json)")
    families: dict[str, list[RunSpectrum]] = defaultdict(list)
    skipped = []
    for run_dir in run_dirs:
        result = json.loads((run_dir / "result.json").read_text())
        if result.get("diverged"):
            skipped.append(run_dir.name)
            continue
        families[_family_key(result["config"])].append(load_run(run_dir))
    report = [_family_report(runs) for runs in families.values()]
    report.sort(key=lambda f: (f["optim"], -math.inf if f["gamma"] is None else -f["gamma"]))
    return {"sweep_dir": str(root), "families": report, "skipped_diverged": skipped}


def _family_report(runs: list[RunSpectrum]) -> dict:
    by_width: dict[int, list[RunSpectrum]] = defaultdict(list)
    for run in runs:
        by_width[run.config.model.width].append(run)
    widths = sorted(by_width)
    roles = runs[0].roles
    names = [n for n in roles if all(n in r.sigma for r in runs)]
    # per matrix and width: geometric mean over seeds
    log_sigma = {n: [np.mean([math.log(r.sigma[n]) for r in by_width[w]]) for w in widths]
                 for n in names}
    matrices = [{"matrix": n, "role": roles[n], "sigma": [math.exp(v) for v in log_sigma[n]],
                 "ratio": math.exp(log_sigma[n][-1] - log_sigma[n][0])} for n in names]
    doublings = math.log2(widths[-1] / widths[0]) if len(widths) > 1 else None
    per_role = {}
    for role in _ordered({roles[n] for n in names}):
        members = [log_sigma[n] for n in names if roles[n] == role]
        log_mean = np.mean(members, axis=0)
        log2_ratio = (log_mean[-1] - log_mean[0]) / math.log(2)
        per_role[role] = {"sigma": np.exp(log_mean).tolist(), "ratio": 2.0**log2_ratio,
                          "log2_ratio_per_doubling": log2_ratio / doublings if doublings
                          else None, "matrices": len(members)}
    cfg = runs[0].config
    decay = [hidden_decay(by_width[w][0].config) for w in widths]
    return {"label": _family_label(cfg), "param": cfg.param.name, "optim": cfg.optim.name,
            "gamma": cfg.optim.wd_width_exponent, "weight_decay": cfg.optim.weight_decay,
            "lr": cfg.optim.lr, "steps": cfg.train.steps, "widths": widths,
            "seeds": [len(by_width[w]) for w in widths],
            "sources": sorted({r.source for r in runs}),
            "decay": {"eta_lambda_steps": [d["eta_lambda_steps"] for d in decay],
                      "integrated": [d["integrated"] for d in decay]},
            "roles": per_role, "matrices": matrices}


def sweep_rows(report: dict) -> list[dict]:
    """One row per family and role, for the CSV and the printed table."""
    rows = []
    for f in report["families"]:
        for role, r in f["roles"].items():
            row = {"family": f["label"], "gamma": f["gamma"], "role": role}
            row |= {f"sigma_w{w}": s for w, s in zip(f["widths"], r["sigma"], strict=True)}
            row |= {"ratio": r["ratio"], "log2_ratio_per_doubling": r["log2_ratio_per_doubling"],
                    "min_eta_lambda_steps": min(f["decay"]["eta_lambda_steps"]),
                    "min_integrated_decay": min(f["decay"]["integrated"])}
            rows.append(row)
    return rows


def format_sweep(report: dict) -> str:
    """Per family: its decay per width, then σ per role at each width and the ratio across."""
    lines = []
    for f in report["families"]:
        widths = f["widths"]
        lines.append(f"{f['label']}  steps={f['steps']}  seeds={f['seeds']}  "
                     f"σ from {', '.join(f['sources'])}")
        decay = f["decay"]
        lines.append("  hidden ηλ·steps per width: " + ", ".join(
            f"w{w} {p:.3g} (Σ η_tλ {i:.3g})" for w, p, i in
            zip(widths, decay["eta_lambda_steps"], decay["integrated"], strict=True)))
        header = "  ".join(f"{'σ w' + str(w):>9}" for w in widths)
        lines.append(f"  {'role':<7}  {header}  {'ratio':>7}  {'log2/doubling':>13}")
        for role, r in f["roles"].items():
            sigmas = "  ".join(f"{s:>9.4g}" for s in r["sigma"])
            lines.append(f"  {role:<7}  {sigmas}  {r['ratio']:>7.3f}  "
                         f"{_fmt(r['log2_ratio_per_doubling'], '+.3f'):>13}")
    if report["skipped_diverged"]:
        lines.append(f"skipped {len(report['skipped_diverged'])} diverged runs")
    return "\n".join(lines)


# ---- figures ---------------------------------------------------------------------------------

def _save(fig: Figure, path: Path) -> Path:
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=DPI, bbox_inches="tight")
    return path


def plot_comparison(rows: list[dict], label_a: str, label_b: str, path: Path) -> Path:
    """σ_max per matrix of both runs (top) and their ratio B/A (bottom), matrices in model order."""
    x = np.arange(len(rows))
    fig = Figure(figsize=(max(6.0, 0.42 * len(rows) + 2), 5.2))
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    for key, label, marker in (("sigma_a", f"A: {label_a}", "o"), ("sigma_b", f"B: {label_b}",
                                                                     "s")):
        values = [np.nan if r[key] is None else r[key] for r in rows]
        top.plot(x, values, marker, mfc="none", label=label)
    top.set_yscale("log")
    span_log_y(top, [r[key] for r in rows for key in ("sigma_a", "sigma_b") if r[key] is not None])
    top.set_ylabel("top singular value σ_max")
    top.legend(fontsize=7, loc="best")
    ratios = [np.nan if r["ratio"] is None else r["ratio"] for r in rows]
    colour = {role: f"C{i + 2}" for i, role in enumerate(ROLE_ORDER)}
    bottom.bar(x, ratios, color=[colour.get(r["role"], "C7") for r in rows])
    bottom.axhline(1.0, color="k", lw=0.8, ls="--")
    bottom.set_yscale("log", base=2)
    span_log_y(bottom, [1.0, *(r["ratio"] for r in rows if r["ratio"] is not None)])
    bottom.set_ylabel("B / A")
    bottom.set_xticks(x, [r["matrix"] for r in rows], rotation=70, fontsize=7)
    fig.legend(handles=[Patch(color=c, label=role) for role, c in colour.items()
                        if any(r["role"] == role for r in rows)], fontsize=7, ncols=3,
               loc="upper right", title="bar colour: role", title_fontsize=7)
    fig.suptitle("σ_max per matrix, and the ratio B / A", fontsize=9, x=0.3)
    return _save(fig, path)


def plot_sweep(report: dict, path: Path) -> Path:
    """σ_max against width relative to the narrowest width, per role (geometric mean over the
    role's matrices and seeds), one line per family: a flat line is a width-invariant σ, and
    reads flat on the shared y axis, which spans a factor of 4 at least."""
    roles = _ordered({role for f in report["families"] for role in f["roles"]})
    fig = Figure(figsize=(3.6 * len(roles), 3.4))
    axes = fig.subplots(1, len(roles), squeeze=False, sharey=True)[0]
    ratios = [1.0]
    for ax, role in zip(axes, roles, strict=True):
        for i, f in enumerate(report["families"]):
            if role in f["roles"]:
                sigma = f["roles"][role]["sigma"]
                ratios += [v / sigma[0] for v in sigma]
                ax.plot(f["widths"], [v / sigma[0] for v in sigma], marker="os^vDP<>"[i % 8],
                        mfc="none", color=f"C{i}", label=f["label"])
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        label_log_axis(ax.xaxis, [w for f in report["families"] for w in f["widths"]])
        ax.set_yscale("log", base=2)
        ax.set_xlabel("width")
        ax.set_title(f"{role} matrices", fontsize=9)
    span_log_y(axes[0], ratios)  # the panels share y: one range and one set of ticks
    axes[0].set_ylabel("σ_max / σ_max at the narrowest width")
    fig.legend(*axes[-1].get_legend_handles_labels(), fontsize=7, loc="lower center",
               ncols=min(3, len(report["families"])), bbox_to_anchor=(0.5, -0.02 - 0.05 * (
                   (len(report["families"]) - 1) // 3)))
    fig.subplots_adjust(bottom=0.24)
    return _save(fig, path)
