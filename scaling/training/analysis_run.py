"""The sweep's analysis as its own W&B run: tables of runs and optima, the plots, and the verdicts
(drift, exponents) as summary values, in the sweep's group next to the runs it analyzes."""

from __future__ import annotations

from pathlib import Path

from scaling.config import LoggingConfig
from scaling.plots import family_names
from scaling.training.tracking import wandb_entity, wandb_mode, wandb_project

OPTIMA_COLUMNS = ["param", "optim", "width", "depth", "tokens", "log2_lr", "lr", "argmin_log2_lr",
                  "on_edge", "best_loss"]
# (analysis section, summary key prefix, value, fields always in the family's name): one summary
# value per family of each section. A depth family is named by its width, as a width family by
# its depth.
NAMED_BY_DEPTH, NAMED_BY_WIDTH = ("param", "depth"), ("param", "width")
SUMMARY_FIELDS = [("drift", "drift", "drift_octaves", NAMED_BY_DEPTH),
                  ("wider_is_better", "wider_is_better", "holds", NAMED_BY_DEPTH),
                  ("depth_drift", "depth_drift", "drift_octaves", NAMED_BY_WIDTH),
                  ("deeper_is_better", "deeper_is_better", "holds", NAMED_BY_WIDTH),
                  ("lr_vs_tokens", "lr_vs_tokens_exponent", "exponent", NAMED_BY_DEPTH),
                  ("loss_vs_compute", "loss_vs_compute_exponent", "exponent", NAMED_BY_DEPTH),
                  ("path_drift", "path_drift", "drift_octaves", ("param",))]


def log_analysis(analysis: dict, images: list[Path], *, project: str | None, group: str | None,
                 mode: str | None, directory: Path) -> str | None:
    """Logs one W&B run with job_type 'analysis'; returns its id, or None when mode is disabled.

    mode and project None defer to WANDB_MODE / WANDB_PROJECT, as a training run's do."""
    logging = LoggingConfig(wandb_mode=mode, project=project)
    mode = wandb_mode(logging)
    if mode == "disabled":
        return None
    import wandb  # slow to import; only when logging is on

    run = wandb.init(project=wandb_project(logging), entity=wandb_entity(logging), group=group,
                     job_type="analysis",
                     name=f"analysis-{group or 'sweep'}", dir=str(directory), mode=mode,
                     settings=wandb.Settings(silent=True, console="off"), reinit="create_new")
    runs = analysis["runs"]
    columns = list(runs[0]) if runs else []
    optima_columns = _optima_columns(analysis["shapes"])
    run.log({"runs": wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in runs]),
             "optima": wandb.Table(columns=optima_columns,
                                   data=[_optimum_row(s, optima_columns)
                                         for s in analysis["shapes"]]),
             **{path.stem: wandb.Image(str(path)) for path in images}})
    run.summary.update(_summary(analysis))
    run.finish()
    return run.id


def _optima_columns(shapes: list[dict]) -> list[str]:
    """OPTIMA_COLUMNS, with MeZO's probe scaling after the optimizer where a shape has one."""
    if not any("probes" in s for s in shapes):
        return OPTIMA_COLUMNS
    at = OPTIMA_COLUMNS.index("optim") + 1
    return [*OPTIMA_COLUMNS[:at], "probes", *OPTIMA_COLUMNS[at:]]


def _optimum_row(shape: dict, columns: list[str]) -> list:
    optimum = shape["optimum"] or {}  # None when every run of the shape diverged
    row = shape | {k: optimum.get(k) for k in ("log2_lr", "lr", "argmin_log2_lr", "on_edge")}
    return [row.get(c) for c in columns]  # probes: None for a non-MeZO shape among MeZO ones


def _summary(analysis: dict) -> dict:
    """Per-family verdicts under keys such as 'drift/mup/d2', 'depth_drift/completep/w64' and
    'loss_vs_compute_exponent/sp'."""
    values = {}
    for section, prefix, field, named in SUMMARY_FIELDS:
        entries = analysis.get(section, [])
        families = [e.get("family", e) for e in entries]  # loss_vs_compute rows are their family
        for entry, parts in zip(entries, family_names(families, named), strict=True):
            values[f"{prefix}/{'/'.join(parts)}"] = entry[field]
    tunes = analysis.get("tunes", [])  # the tuned value of each multiplier, per family
    for tune, parts in zip(tunes, family_names([t["family"] for t in tunes], ("param", "width")),
                           strict=True):
        values[f"tune/{tune['field']}/{'/'.join(parts)}"] = tune["optimum"]["value"]
    paths = analysis.get("path_drift", [])  # per law, the slope it leaves along each path
    for path, parts in zip(paths, family_names([p["family"] for p in paths], ("param",)),
                           strict=True):
        for law, left in path["laws"].items():
            values[f"path_slope_left/{law}/{'/'.join(parts)}"] = left["slope"]
    values["unfinished"] = len(analysis["unfinished"])  # runs a partial sweep's analysis lacks
    return values
