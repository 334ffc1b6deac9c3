"""Coordinate check (TP-V, the `mup` library's check): the RMS of every module's output at init
and after a few optimizer steps on one fixed batch, across widths (`coordinate_check`) or across
depths (`depth_check`, TP-VI), and the RMS of every parameter's update θ_t − θ_{t−1} (one per
layer of a stacked leaf). Under μP the module outputs are flat in width; under a depth rule
(Depth-μP, CompleteP) the residual stream is flat in depth too.

Besides the model's own forward stats it records `logits_delta`, the RMS of the change of the
logits since init. With readout_init='normal', μP's init logits shrink like 1/sqrt(m) by design
(constant readout std, logits × 1/m), and so do the parts of the change that go through the init
readout; only the readout's own update gives a Θ(1) change. readout_init='zero' removes the
vanishing terms, which otherwise dominate at small widths.

Flatness is judged by slopes: the least-squares slope of log2 RMS against log2 width (or depth)
of every quantity at every step (`slope_rows`), required within a tolerance for the quantities
and parametrizations `is_checked` and `flat_in` name (`failures`): by default each scheme is
held to the axes its own record claims (scaling/schemes.py).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.config import ModelConfig
from models.layers import rms
from models.tagged import LAYER_AXIS, ParamSpec, leaf_at
from optim import OptimizerConfig
from scaling.config import ConfigError, ParamConfig
from scaling.parametrization import build_model
from scaling.rules import ONE
from scaling.schemes import DEPTH, SCHEMES, WIDTH
from scaling.steps import make_step

# width (depth for depth_check) -> step (0 = init) -> quantity -> RMS. Quantities are module
# outputs ("logits", "attn_out/0", ...) and, from step 1, parameter updates
# ("update/blocks.wq/0": layer 0 of the stacked leaf at path ("blocks", "wq")).
CoordStats = dict[int, dict[int, dict[str, float]]]
UPDATE = "update"
# Forward stats the models report that are not the RMS of an output: stability indicators (the
# mean squared log-partition of the attention logits, a percentage of outlying features), whose
# log-log slope against width says nothing about scale.
NOT_RMS = ("attn_z", "outliers")


def update_name(path: tuple) -> str:
    """The quantity name of a parameter's update: its path, dot-joined, after 'update/'."""
    return f"{UPDATE}/{'.'.join(map(str, path))}"


def is_update(name: str) -> bool:
    return name.startswith(UPDATE + "/")


def _flatten(stats: dict[str, jax.Array]) -> dict[str, float]:
    """Per-layer stats (shape (depth,)) become one entry per layer: 'attn_out/0', 'attn_out/1'.
    Stats that are not an RMS (NOT_RMS) are left out."""
    out: dict[str, float] = {}
    for name, value in jax.device_get(stats).items():  # one transfer for them all
        if name in NOT_RMS:
            continue
        if np.ndim(value) == 0:
            out[name] = float(value)
        else:
            out.update({f"{name}/{i}": float(v) for i, v in enumerate(value)})
    return out


def update_rms(before, after, specs: dict[tuple, ParamSpec]) -> dict[str, jax.Array]:
    """RMS of θ_after − θ_before per parameter (parameter trees like the model's), one per
    layer where the leaf has a layer axis (its logical axis LAYER_AXIS); jit-able."""
    out = {}
    for path, spec in specs.items():
        delta = leaf_at(after, path).astype(jnp.float32) - leaf_at(before, path)
        if LAYER_AXIS in spec.logical_axes:
            layers = jnp.moveaxis(delta, spec.logical_axes.index(LAYER_AXIS), 0)
            out[update_name(path)] = jnp.sqrt(jnp.mean(jnp.square(layers.reshape(len(layers),
                                                                                -1)), axis=1))
        else:
            out[update_name(path)] = rms(delta)
    return out


def trajectory(forward, train_step, updates, state, steps: int, inputs_BxT: jax.Array,
               targets_BxT: jax.Array) -> dict[int, dict[str, float]]:
    """Every quantity at init and after each of `steps` steps on the one batch: `forward(params,
    inputs) -> (logits, stats)`, `train_step(state, inputs, targets) -> (state, _)` on a state
    with `.params`, `updates(before, after)` the parameter updates' RMS."""
    logits0_BxTxV = forward(state.params, inputs_BxT)[0]

    def measure(p) -> dict[str, float]:
        logits_BxTxV, stats = forward(p, inputs_BxT)
        return _flatten(stats) | {"logits_delta": float(rms(logits_BxTxV - logits0_BxTxV))}

    out = {0: measure(state.params)}
    for step in range(1, steps + 1):
        before = jax.tree.map(jnp.copy, state.params)  # the step donates the state
        state, _ = train_step(state, inputs_BxT, targets_BxT)
        out[step] = measure(state.params) | _flatten(updates(before, state.params))
    return out


def _one_shape(model_cfg: ModelConfig, param_cfg: ParamConfig, optim_cfg: OptimizerConfig,
               steps: int, inputs_BxT: jax.Array, targets_BxT: jax.Array, vocab_size: int,
               seeds: list[int]) -> dict[int, dict[str, float]]:
    """The mean over initializations `seeds` of every quantity's RMS (as the `mup` library
    averages its coordinate check over seeds): one compiled forward and step serve them all."""
    model, parametrization = build_model(model_cfg, param_cfg, vocab_size, seeds[0])
    graphdef, params = nnx.split(model)
    # the tokens are an argument, not a constant of the program: one program per shape whatever
    # the batch, which the persistent compilation cache then serves
    forward = jax.jit(lambda p, tokens_BxT: nnx.merge(graphdef, p).forward(tokens_BxT))
    # the step measures nothing it logs: the check measures the forward itself
    train_step = make_step(optim_cfg, parametrization, graphdef, total_steps=max(steps, 1),
                           indicators=False, seed=seeds[0])
    updates = jax.jit(lambda before, after: update_rms(before, after, parametrization.specs))
    runs = []
    for seed in seeds:
        if seed != seeds[0]:
            params = nnx.split(build_model(model_cfg, param_cfg, vocab_size, seed)[0])[1]
        runs.append(trajectory(forward, train_step, updates,
                               train_step.init_state(params.to_pure_dict(), optim_cfg.lr),
                               steps, inputs_BxT, targets_BxT))
    return mean_over_runs(runs)


def mean_over_runs(runs: list[dict[int, dict[str, float]]]) -> dict[int, dict[str, float]]:
    """Each quantity's mean over the runs (initializations) at every step."""
    return {step: {name: float(np.mean([run[step][name] for run in runs]))
                   for name in runs[0][step]}
            for step in runs[0]}


def coordinate_check(model_cfg: ModelConfig, param_cfg: ParamConfig, optim_cfg: OptimizerConfig,
                     widths: list[int], steps: int, batch: tuple[jax.Array, jax.Array], *,
                     vocab_size: int = 256, seed: int = 0, seeds: int = 1) -> CoordStats:
    """Trains `steps` steps on `batch` = (inputs_BxT, targets_BxT) at each width, recording
    the model's forward stats (`model.forward(inputs)[1]`) before the first step and after each,
    and the RMS of every parameter's update at each step; each the mean over the `seeds`
    initializations seed, seed + 1, ..."""
    return {width: _one_shape(dataclasses.replace(model_cfg, width=width), param_cfg, optim_cfg,
                              steps, *batch, vocab_size, list(range(seed, seed + seeds)))
            for width in widths}


def depth_check(model_cfg: ModelConfig, param_cfg: ParamConfig, optim_cfg: OptimizerConfig,
                depths: list[int], steps: int, batch: tuple[jax.Array, jax.Array], *,
                vocab_size: int = 256, seed: int = 0, seeds: int = 1) -> CoordStats:
    """`coordinate_check` across depths (number of blocks) at `model_cfg`'s width: the outer
    key of the result is the depth, and the per-layer stats run to 'block_out/{depth - 1}'."""
    return {depth: _one_shape(dataclasses.replace(model_cfg, depth=depth), param_cfg, optim_cfg,
                              steps, *batch, vocab_size, list(range(seed, seed + seeds)))
            for depth in depths}




def claimed_flat(axis: str) -> tuple[str, ...]:
    """The schemes whose record claims Θ(1) coordinates along `axis` (WIDTH or DEPTH)."""
    return tuple(name for name, scheme in SCHEMES.items() if axis in scheme.flat_in)


# A depth rule scales each residual branch by r^(−α): what stays flat is their sum, the stream.
BRANCH_OUTPUTS = ("attn_out", "mlp_out")
# With a normal readout μP's logits shrink like 1/√m at init by design (constant readout std,
# logits × 1/m), and the parts of later logits that pass through that readout with them.
READOUT_DEPENDENT = ("logits", "logits_delta")
_LAYER = re.compile(r"^(?P<base>.+)/(?P<layer>\d+)$")


@dataclasses.dataclass(frozen=True)
class CoordConfig:
    """The check's own fields (`scaling-coord-check`'s `coord` node); the model, base shape,
    optimizer and data come from the run config."""

    widths: tuple[int, ...] | None = (64, 128, 256, 512)  # None: no check across width
    depths: tuple[int, ...] | None = None  # None: no check across depth
    params: tuple[str, ...] = ("sp", "mup")  # compared side by side
    steps: int = 3
    seeds: int = 3  # initializations averaged (data: one fixed batch)
    tolerance: float = 0.125  # |slope| of log2 RMS per doubling; 1.3x over 8x is 0.126
    batch_size: int = 4
    seq_len: int = 32
    check: bool = False  # exit non-zero when a slope that must be flat is beyond tolerance
    out_dir: str = "runs/coord_check"
    # the parametrizations that must be flat; None: those whose rule claims it, so SP is the
    # contrast. [sp, mup] holds SP to μP's claim, and SP then fails the check.
    require_flat: tuple[str, ...] | None = None

    def flat_in(self, axis: str) -> tuple[str, ...]:
        return claimed_flat(axis) if self.require_flat is None else self.require_flat


def _axis_values(field: str, values: Any) -> tuple[int, ...] | None:
    if values is None:
        return None
    ok = (isinstance(values, (list, tuple)) and len(values) >= 2
          and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)
          and len(set(values)) == len(values))
    if not ok:
        raise ConfigError(field, values, "null, or a list of at least two distinct positive "
                                         "integers (a slope needs two points)")
    return tuple(sorted(values))


def coord_config(values: Mapping[str, Any]) -> CoordConfig:
    """The `coord` node as a CoordConfig; ConfigError names the first bad field."""
    known = {f.name for f in dataclasses.fields(CoordConfig)}
    for key in values:
        if key not in known:
            raise ConfigError(f"coord.{key}", values[key], f"one of the fields {sorted(known)}")
    defaults = dataclasses.asdict(CoordConfig())
    v = {**defaults, **values}
    widths = _axis_values("coord.widths", v["widths"])
    depths = _axis_values("coord.depths", v["depths"])
    if widths is None and depths is None:
        raise ConfigError("coord.widths", None, "a list of widths when coord.depths is null too "
                                                "(a check needs an axis)")
    params = v["params"]
    if (not isinstance(params, (list, tuple)) or not params or len(set(params)) != len(params)
            or not all(p in SCHEMES for p in params)):
        raise ConfigError("coord.params", params,
                          f"a list of distinct parametrizations from {list(SCHEMES)}")
    for name in ("steps", "seeds", "batch_size", "seq_len"):
        if not (isinstance(v[name], int) and not isinstance(v[name], bool) and v[name] > 0):
            raise ConfigError(f"coord.{name}", v[name], "a positive integer")
    tolerance = v["tolerance"]
    if (isinstance(tolerance, bool) or not isinstance(tolerance, (int, float))
            or not 0 < tolerance < math.inf):
        raise ConfigError("coord.tolerance", tolerance,
                          "a positive number, the largest |slope| of log2 RMS against log2 "
                          "width (or depth) counted as flat")
    if not isinstance(v["check"], bool):
        raise ConfigError("coord.check", v["check"], "true or false")
    if not isinstance(v["out_dir"], str) or not v["out_dir"].strip():
        raise ConfigError("coord.out_dir", v["out_dir"], "a folder for the check's outputs")
    flat = v["require_flat"]
    if flat is not None and (not isinstance(flat, (list, tuple)) or not flat
                             or not all(p in SCHEMES for p in flat)):
        raise ConfigError("coord.require_flat", flat, "null (the parametrizations whose rule "
                          f"claims flatness), or a list from {list(SCHEMES)}")
    return CoordConfig(widths=widths, depths=depths, params=tuple(params), steps=v["steps"],
                       seeds=v["seeds"], tolerance=float(tolerance), batch_size=v["batch_size"],
                       seq_len=v["seq_len"], check=v["check"], out_dir=v["out_dir"],
                       require_flat=None if flat is None else tuple(flat))


def fit_slope(xs: list[int], ys: list[float]) -> float | None:
    """Least-squares slope of log2 y against log2 x; None when every y is 0 (nothing to
    compare: a zero readout's init logits), NaN when some y is 0 or not finite."""
    ys_N = np.asarray(ys, np.float64)
    if np.all(ys_N == 0):
        return None
    if not np.all(np.isfinite(ys_N) & (ys_N > 0)):
        return math.nan
    return float(np.polyfit(np.log2(xs), np.log2(ys_N), 1)[0])


def comparable(step_stats: dict[str, float], depth: int | None) -> dict[str, float]:
    """The quantities that exist at every value of the axis. Across width, all of them; across
    depth, the last layer's as '<name>/last' (the stream the readout reads), and no other layer:
    layer i of a deep model is not layer i of a shallow one."""
    if depth is None:
        return step_stats
    out = {}
    for name, value in step_stats.items():
        match = _LAYER.match(name)
        if match is None:
            out[name] = value
        elif int(match["layer"]) == depth - 1:
            out[f"{match['base']}/last"] = value
    return out


def slopes(stats: CoordStats, axis: str) -> dict[int, dict[str, float | None]]:
    """step -> quantity -> its fitted slope across the axis values (widths or depths)."""
    values = sorted(stats)
    out = {}
    for step in sorted(stats[values[0]]):
        per_value = [comparable(stats[v][step], v if axis == DEPTH else None) for v in values]
        names = [n for n in per_value[0] if all(n in p for p in per_value)]
        out[step] = {n: fit_slope(values, [p[n] for p in per_value]) for n in names}
    return out


def base_name(quantity: str) -> str:
    """'attn_out' of 'attn_out/3' and of 'attn_out/last'."""
    head, _, tail = quantity.rpartition("/")
    return head if head and (tail.isdigit() or tail == "last") else quantity


def is_checked(quantity: str, axis: str, readout_init: str) -> bool:
    """Whether a parametrization that must be flat along `axis` must have this quantity flat.

    Parameter updates never are: under μP an Adam step moves every hidden weight by η/m, so
    their RMS falls like 1/m by design (it is what keeps the change of every output Θ(1)).
    Across depth, single residual branches shrink like r^(−α) by design, and only the stream
    and what reads it must stay flat. With a normal readout the logits shrink with width by
    design (READOUT_DEPENDENT)."""
    base = base_name(quantity)
    if is_update(quantity):
        return False
    if axis == DEPTH:
        return base not in BRANCH_OUTPUTS
    return not (readout_init == "normal" and base in READOUT_DEPENDENT)


def what_is_checked(axis: str, readout_init: str, tolerance: float,
                    flat_params: tuple[str, ...] | None = None) -> str:
    """One sentence on what the check covers along `axis` (for `flat_params`, else the schemes
    that claim it)."""
    flat = ", ".join(claimed_flat(axis) if flat_params is None else flat_params)
    if not flat:
        return (f"nothing across {axis}: no parametrization that ran claims flat coordinates "
                "along it, so every slope is reported, not checked")
    if axis == WIDTH:
        left_out = ("; logits and logits_delta are reported, not checked: with "
                    "model.readout_init=normal they shrink with width by design"
                    if readout_init == "normal" else "")
        return (f"across width, for {flat}: every module output's |slope| ≤ {tolerance:g} at "
                f"every step{left_out}; parameter updates are reported, not checked")
    return (f"across depth, for {flat}: |slope| ≤ {tolerance:g} at every step for the embedding, "
            f"the last block's output (the residual stream), the logits and their change; single "
            f"branches ({', '.join(BRANCH_OUTPUTS)}) and parameter updates are reported, not "
            f"checked")


@dataclasses.dataclass(frozen=True)
class Slope:
    """One fitted slope: of `quantity`'s RMS at `step` against log2 of the axis value."""

    axis: str
    param: str
    step: int
    quantity: str
    slope: float
    covered: bool  # a quantity the check covers along this axis (is_checked)
    must_be_flat: bool  # its parametrization must be flat along the axis

    @property
    def required(self) -> bool:
        """Checked: a covered quantity of a parametrization that must be flat along the axis."""
        return self.covered and self.must_be_flat

    def within(self, tolerance: float) -> bool:
        return math.isfinite(self.slope) and abs(self.slope) <= tolerance


def slope_rows(stats_by_param: dict[str, CoordStats], axis: str, readout_init: str,
               flat_params: tuple[str, ...] | None = None) -> list[Slope]:
    """Every fitted slope of every parametrization along one axis; `flat_params` must be flat
    (None: those whose rule claims it)."""
    flat = claimed_flat(axis) if flat_params is None else flat_params
    return [Slope(axis, param, step, name, slope, is_checked(name, axis, readout_init),
                  param in flat)
            for param, stats in stats_by_param.items()
            for step, fitted in slopes(stats, axis).items()
            for name, slope in fitted.items() if slope is not None]


def failures(rows: list[Slope], tolerance: float) -> list[Slope]:
    """The checked slopes beyond the tolerance (or not finite): the check fails on any."""
    return [r for r in rows if r.required and not r.within(tolerance)]


def verdict(rows: list[Slope], axis: str, param: str, tolerance: float) -> str:
    """One line per parametrization and axis: flat or not, over the quantities the check
    covers, with the largest |slope| and where it is."""
    covered = [r for r in rows if r.axis == axis and r.param == param and r.covered]
    if not covered:
        return f"{axis} {param}: nothing the check covers was measured"
    beyond = [r for r in covered if not r.within(tolerance)]
    worst = max(covered, key=lambda r: abs(r.slope) if math.isfinite(r.slope) else math.inf)
    where = f"largest |slope| {abs(worst.slope):.2f}: {worst.quantity} at step {worst.step}"
    must = covered[0].must_be_flat
    role = "checked" if must else "not required flat"
    state = "FAIL" if beyond and must else "flat" if not beyond else "not flat"
    return (f"{axis} {param} ({role}): {state}, {len(beyond)} of {len(covered)} slopes beyond "
            f"±{tolerance:g} ({where})")


def _table_order(quantity: str) -> tuple:
    """Module outputs before updates; what has no layer first, then layer by layer."""
    match = _LAYER.match(quantity)
    layer = -1 if match is None else int(match["layer"])
    return is_update(quantity), layer, base_name(quantity)


def _cell(row: Slope, tolerance: float) -> str:
    text = "nan" if not math.isfinite(row.slope) else f"{row.slope:+.2f}"
    if not row.required:
        return f"({text})"
    return text if row.within(tolerance) else f"**{text}** ✗"


def markdown_table(rows: list[Slope], axis: str, tolerance: float) -> str:
    """Slopes along one axis: a row per quantity, a column per parametrization and step.
    Checked slopes plain (✗ beyond the tolerance), the rest in parentheses."""
    rows = [r for r in rows if r.axis == axis]
    columns = list(dict.fromkeys((r.param, r.step) for r in rows))
    quantities = sorted({r.quantity for r in rows}, key=_table_order)
    cells = {(r.quantity, r.param, r.step): _cell(r, tolerance) for r in rows}
    head = [f"{param} step {step}" for param, step in columns]
    lines = [f"| {axis} slope | " + " | ".join(head) + " |",
             "|---|" + "---|" * len(head)]
    for q in quantities:
        lines.append(f"| {q} | " + " | ".join(cells.get((q, *c), "") for c in columns) + " |")
    return "\n".join(lines)


# logits_delta's slope after one step above this: the readout's update reaches the output
# unscaled (Adam: grows like m, SGD like m²; with μP's 1/m multiplier it is flat)
UNSCALED_READOUT_SLOPE = 0.5


def readout_warnings(stats: dict[str, CoordStats]) -> list[str]:
    """One line per scheme with a readout multiplier (μP's 1/m) whose output's change after one
    step grows with width as if the multiplier were missing (measured, not looked up)."""
    out = []
    for scheme, by_width in stats.items():
        if SCHEMES[scheme].width["output"].forward == ONE:
            continue
        slope = slopes(by_width, WIDTH).get(1, {}).get("logits_delta")
        if slope is not None and slope > UNSCALED_READOUT_SLOPE:
            out.append(f"{scheme}: the output's change after one step grows like "
                       f"width^{slope:.2f}; is the readout's output multiplied by "
                       "models.multipliers.ReadoutMultiplier?")
    return out
