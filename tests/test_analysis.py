"""Sweep analysis recovers optima, drift and power laws planted in synthetic results."""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import pytest
from synthetic import run_result, write_results

from optim import MeZOConfig
from scaling.analysis import analyze, format_table, load_results
from scaling.config import RunConfig, to_dict
from scaling.fits import fit_optimum, fit_power_law
from scaling.plots import family_names
from scaling.training.analysis_run import _summary

GRID = np.arange(-14.0, -3.9, 0.5)  # log2 LR on a half-octave grid
BATCH, SEQ_LEN = 16, 64


# This file's runs: 200 steps unless told, batches of 16 × 64 tokens, one W&B group, training
# loss 0.05 below validation loss.
_result = functools.partial(run_result, steps=200, batch=BATCH, seq_len=SEQ_LEN,
                            group="sweep-1a2b3c4d", train_gap=-0.05)


def _sweep(optimum, floor=lambda width, tokens: 2.0, params=("mup",), widths=(64,), seeds=3,
           steps=(200,), noise=0.002, diverge_above=None, rng_seed=0) -> list[dict]:
    """Runs whose loss is 0.05·(log2 lr − optimum)² + floor plus Gaussian noise."""
    rng = np.random.default_rng(rng_seed)
    results = []
    for param in params:
        for width in widths:
            for n_steps in steps:
                tokens = n_steps * BATCH * SEQ_LEN
                c, b = optimum(width, tokens), floor(width, tokens)
                for seed in range(seeds):
                    for x in GRID:
                        loss = 0.05 * (x - c) ** 2 + b + noise * rng.standard_normal()
                        diverged = diverge_above is not None and x > diverge_above
                        results.append(_result(param, width, x, seed, loss, steps=n_steps,
                                               diverged=diverged))
    return results


def test_recovers_optimum_between_grid_points(tmp_path):
    c = -8.25  # halfway between grid points: the raw argmin is off by a quarter octave
    results = _sweep(lambda w, t: c, params=("mup", "sp"), widths=(64, 128))
    for i in range(3):  # spread over three folders, as separate sweep jobs leave them
        write_results(tmp_path / "sweep" / f"group{i}", results[::7][i::3])
    (tmp_path / "sweep" / "analysis").mkdir()
    (tmp_path / "sweep" / "analysis" / "result.json").write_text("not a run")
    loaded = load_results(tmp_path / "sweep")
    assert [r["name"] for r in loaded] == sorted(r["name"] for r in results[::7])

    analysis = analyze(results)
    assert len(analysis["shapes"]) == 4 and analysis["group"] == "sweep-1a2b3c4d"
    for shape in analysis["shapes"]:
        optimum = shape["optimum"]
        assert optimum["fitted"] and not optimum["on_edge"]
        assert abs(optimum["log2_lr"] - c) < 0.1, shape["id"]
        assert abs(optimum["log2_lr"] - c) < abs(optimum["argmin_log2_lr"] - c)
        assert shape["seeds"] == [0, 1, 2] and len(shape["seed_optima"]) == 3
        assert all(abs(o - c) < 0.2 for o in shape["seed_optima"])


def test_load_results_names_the_empty_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_results(tmp_path)


def test_on_edge_when_the_minimum_is_beyond_the_grid():
    x = GRID
    assert fit_optimum(x, 0.05 * (x + 2.0) ** 2).on_edge  # minimum above the largest LR
    assert not fit_optimum(x, 0.05 * (x + 9.0) ** 2).on_edge
    shape = analyze(_sweep(lambda w, t: -20.0))["shapes"][0]
    assert shape["optimum"]["on_edge"] and shape["optimum"]["argmin_log2_lr"] == GRID[0]


def test_concave_neighbourhood_falls_back_to_the_argmin():
    optimum = fit_optimum([-9.0, -8.5, -8.0, -7.5], [2.0, 2.9, 3.0, 2.95])
    assert not optimum.fitted and optimum.log2_lr == optimum.argmin_log2_lr == -9.0
    assert optimum.loss == 2.0 and optimum.on_edge


def test_diverged_runs_are_excluded():
    c = -8.25
    results = _sweep(lambda w, t: c, diverge_above=-6.0)
    for r in results:
        if r["diverged"]:
            r["train_loss"] = 0.5  # the last loss logged before blowing up must not count
    analysis = analyze(results, metric="train_loss")
    (shape,) = analysis["shapes"]
    assert abs(shape["optimum"]["log2_lr"] - c) < 0.1
    top = shape["curve"][-1]
    assert top["mean"] is None and top["n"] == 0 and top["diverged"] == 3
    assert sum(row["diverged"] for row in analysis["runs"]) == 3 * int(np.sum(GRID > -6.0))
    with pytest.raises(ValueError, match="diverged"):
        fit_optimum([1.0, 2.0], [math.nan, math.nan])


@pytest.mark.parametrize(
    "param, optimum, drift, slope",
    [("mup", lambda w, t: -8.0, 0.0, 0.0),
     ("sp", lambda w, t: -8.0 - math.log2(w / 64), 3.0, -1.0)])
def test_drift_flat_under_mup_and_one_octave_per_doubling_under_sp(param, optimum, drift, slope):
    analysis = analyze(_sweep(optimum, params=(param,), widths=(64, 128, 256, 512)))
    (d,) = analysis["drift"]
    assert d["widths"] == [64, 128, 256, 512] and d["family"]["param"] == param
    assert abs(d["drift_octaves"] - drift) < 0.15
    assert abs(d["slope"] - slope) < 0.05
    assert d["drift_uncertainty"] < 0.2 and not d["any_on_edge"]


def test_power_law_on_exact_data():
    x = np.array([1e5, 2e5, 4e5, 8e5])
    fit = fit_power_law(x, 3.0 * x**-0.32)
    assert fit.exponent == pytest.approx(-0.32, abs=1e-12)
    assert fit.coefficient == pytest.approx(3.0, rel=1e-9)
    assert fit.exponent_stderr == pytest.approx(0.0, abs=1e-9)
    assert math.isnan(fit_power_law(x[:2], x[:2] ** 0.5).exponent_stderr)
    with pytest.raises(ValueError, match="distinct"):
        fit_power_law([2.0, 2.0], [1.0, 1.0])


def test_lr_and_loss_power_laws_in_tokens_and_compute():
    def optimum(width, tokens):
        return -2.0 - 0.32 * math.log2(tokens)  # optimal lr = 2^-2 · tokens^-0.32

    def floor(width, tokens):
        return 20.0 * tokens**-0.1

    analysis = analyze(_sweep(optimum, floor, steps=(100, 200, 400, 800)))
    (fit,) = analysis["lr_vs_tokens"]
    assert fit["tokens"] == [100 * BATCH * SEQ_LEN * 2**i for i in range(4)]
    assert abs(fit["exponent"] + 0.32) < 0.02
    (law,) = analysis["loss_vs_compute"]
    assert abs(law["exponent"] + 0.1) < 0.01
    assert fit["fitted"] and law["fitted"] and fit["points"] == law["points"] == 4


def test_no_power_law_through_two_points():
    """Two budgets fit any power law exactly: null numbers, `fitted: false`, and the table says so
    where the exponent would be."""
    analysis = analyze(_sweep(lambda w, t: -8.0, steps=(100, 400)))
    laws = [*analysis["lr_vs_tokens"], *analysis["loss_vs_compute"]]
    assert len(laws) == 2
    for law in laws:
        assert (law["fitted"], law["points"]) == (False, 2)
        assert law["exponent"] is law["exponent_stderr"] is law["coefficient"] is None
    table = format_table(analysis)
    assert "tokens^(not fitted: 2 points)" in table and "compute^(not fitted: 2 points)" in table


@pytest.mark.parametrize("gap, beyond_noise", [(0.1, True), (0.005, False)])
def test_wider_is_better_against_seed_noise(gap, beyond_noise):
    def floor(width, tokens):
        return 3.0 - gap * math.log2(width / 64)

    spread = 0.01
    results = _sweep(lambda w, t: -8.0, floor, widths=(64, 128, 256), noise=0.0)
    for r in results:  # seeds 0, 1, 2 sit at -spread, 0, +spread: known std, exact means
        r["val_loss"] += spread * (r["config"]["train"]["seed"] - 1)
    (w,) = analyze(results)["wider_is_better"]
    assert w["log2_lr"] == -8.0 and w["widths"] == [64, 128, 256]
    assert w["holds"]  # the mean loss falls with width either way; only the margin differs
    assert w["noise"] == pytest.approx(2 * math.sqrt(2 / 3) * spread)
    assert w["beyond_noise"] is beyond_noise


def test_analysis_is_strict_json():
    results = _sweep(lambda w, t: -8.0, widths=(64, 128), seeds=1, diverge_above=-6.0)
    results.append(_result("mup", 256, -8.0, 0, 0.0, diverged=True))  # a shape that only diverged
    analysis = analyze(results, metric="train_loss")
    assert json.loads(json.dumps(analysis, allow_nan=False)) == analysis
    assert analysis["shapes"][-1]["optimum"] is None
    with pytest.raises(ValueError, match="metric='loss'"):
        analyze(results, metric="loss")


def test_format_table_names_each_width_and_the_drift():
    analysis = analyze(_sweep(lambda w, t: -8.0 - math.log2(w / 64), widths=(64, 512)))
    table = format_table(analysis)
    for shape in analysis["shapes"]:
        assert f" {shape['width']} " in table
    assert "w64→w512: drift 3.0" in table
    assert "noise" in table


def _grid_sweep(optimum, params=("mup",), widths=(64,), depths=(2, 4, 8), seeds=2,
                noise=0.002, floor=lambda width, depth: 2.0) -> list[dict]:
    """Runs over width × depth (base depth 2, shared) whose loss is
    0.05·(log2 lr − optimum(width, depth))² + floor(width, depth) plus Gaussian noise."""
    rng = np.random.default_rng(0)
    return [_result(param, width, x, seed,
                    0.05 * (x - optimum(width, depth)) ** 2 + floor(width, depth)
                    + noise * rng.standard_normal(), depth=depth, base_depth=2)
            for param in params for width in widths for depth in depths
            for seed in range(seeds) for x in GRID]


@pytest.mark.parametrize("optimum, drift, slope", [
    (lambda w, d: -8.0, 0.0, 0.0),  # a depth rule that transfers
    (lambda w, d: -8.0 - 0.5 * math.log2(d / 2), 1.0, -0.5),  # half an octave per doubling
])
def test_depth_drift_like_width_drift(optimum, drift, slope):
    analysis = analyze(_grid_sweep(optimum, depths=(2, 4, 8)))
    assert analysis["drift"] == analysis["wider_is_better"] == []  # one width
    (d,) = analysis["depth_drift"]
    assert d["depths"] == [2, 4, 8] and "widths" not in d
    assert d["family"] == {"param": "mup", "optim": "adamw", "kind": "transformer", "width": 64,
                           "tokens": 200 * BATCH * SEQ_LEN, "batch_size": BATCH}
    assert abs(d["drift_octaves"] - drift) < 0.15 and abs(d["slope"] - slope) < 0.05
    assert d["drift_uncertainty"] < 0.2 and not d["any_on_edge"]
    assert d["n_seeds"] == [2, 2, 2] and len(d["log2_lr"]) == len(d["log2_lr_std"]) == 3


def test_deeper_is_better_at_the_transferred_lr():
    analysis = analyze(_grid_sweep(lambda w, d: -8.0, depths=(2, 4), noise=0.0,
                                   floor=lambda w, d: 3.0 - 0.1 * math.log2(d)))
    (b,) = analysis["deeper_is_better"]
    assert b["depths"] == [2, 4] and b["log2_lr"] == -8.0 and b["family"]["width"] == 64
    assert b["holds"] and b["loss_mean"][1] < b["loss_mean"][0]
    assert b["noise"] == 0.0 and b["beyond_noise"]  # identical seeds: no noise to beat


def test_width_by_depth_grid_gives_both_drifts():
    """Width drift per depth and depth drift per width: each family differs in one axis only."""
    def optimum(width, depth):
        return -8.0 - math.log2(width / 64) - 0.5 * math.log2(depth / 2)

    analysis = analyze(_grid_sweep(optimum, widths=(64, 128, 256), depths=(2, 4), seeds=1))
    assert sorted(d["family"]["depth"] for d in analysis["drift"]) == [2, 4]
    assert sorted(d["family"]["width"] for d in analysis["depth_drift"]) == [64, 128, 256]
    assert len(analysis["wider_is_better"]) == 2 and len(analysis["deeper_is_better"]) == 3
    assert all(abs(d["slope"] + 1.0) < 0.05 for d in analysis["drift"])
    assert all(abs(d["slope"] + 0.5) < 0.05 for d in analysis["depth_drift"])
    table = format_table(analysis)
    assert "mup adamw d2 204800 tokens w64→w256: drift 2.0" in table
    assert "mup adamw w128 204800 tokens d2→d4: drift 0.5" in table
    assert "/depth-octave" in table and "deeper is better" in table
    assert json.loads(json.dumps(analysis, allow_nan=False)) == analysis


def test_depths_with_their_own_base_depth_are_no_family():
    """A run at its own base depth is a different parametrization: no drift across those."""
    results = [_result("mup", 64, x, 0, 0.05 * (x + 8) ** 2 + 2.0, depth=depth)
               for depth in (2, 4) for x in GRID]  # base_depth = depth for each
    assert analyze(results)["depth_drift"] == []


def _as_mezo(result: dict, probe: str, update: str | None = None) -> dict:
    """The same run as MeZO with the given probe and update scalings (update: like the probe)."""
    update = update or probe
    optim = to_dict(RunConfig(optim=MeZOConfig(lr=result["config"]["optim"]["lr"],
                                               probe_scaling=probe, update_scaling=update)))
    name = result["name"].replace("adamw", f"mezo-{probe}-{update}")
    return result | {"name": name, "config": result["config"] | {"optim": optim["optim"]}}


def test_mezo_families_are_split_by_probe_scaling():
    """Isotropic MeZO's optimum falls an octave per doubling, matched MeZO's stays: one family
    each, named apart, while an AdamW family of the same shapes keeps its name."""
    widths = (64, 128, 256)
    adamw = _sweep(lambda w, t: -8.0, widths=widths, seeds=2)
    isotropic = [_as_mezo(r, "isotropic")
                 for r in _sweep(lambda w, t: -8.0 - math.log2(w / 64), widths=widths, seeds=2)]
    matched = [_as_mezo(r, "matched") for r in _sweep(lambda w, t: -9.0, widths=widths, seeds=2)]
    mixed = [_as_mezo(r, "matched", "isotropic")
             for r in _sweep(lambda w, t: -10.0, widths=widths, seeds=2)]
    analysis = analyze(adamw + isotropic + matched + mixed)

    drift = {d["family"].get("probes"): d for d in analysis["drift"]}
    assert sorted(drift, key=str) == ["D=matched,U=isotropic", None, "isotropic", "matched"]
    assert "probes" not in drift[None]["family"] and drift[None]["family"]["optim"] == "adamw"
    assert abs(drift["isotropic"]["slope"] + 1.0) < 0.05
    assert abs(drift["matched"]["drift_octaves"]) < 0.15
    assert abs(np.mean(drift["D=matched,U=isotropic"]["log2_lr"]) + 10.0) < 0.1
    assert len(analysis["shapes"]) == 4 * len(widths)
    assert len(analysis["wider_is_better"]) == len(analysis["loss_vs_compute"]) == 4
    table = format_table(analysis)
    assert "mup mezo[isotropic] d2 204800 tokens w64→w256: drift 2.0" in table
    assert "mup mezo[matched] " in table and "mup adamw d2 204800 tokens w64→w256" in table
    assert json.loads(json.dumps(analysis, allow_nan=False)) == analysis

    names = family_names([d["family"] for d in analysis["drift"]])
    assert sorted(map(tuple, names)) == sorted([
        ("mup", "adamw", "d2"), ("mup", "mezo", "isotropic", "d2"),
        ("mup", "mezo", "matched", "d2"), ("mup", "mezo", "D=matched,U=isotropic", "d2")])
    summary = _summary(analysis)
    assert summary["drift/mup/mezo/isotropic/d2"] == pytest.approx(2.0, abs=0.15)
    assert summary["drift/mup/adamw/d2"] == pytest.approx(0.0, abs=0.15)


def test_a_finite_blown_up_loss_counts_as_diverged():
    """A run whose loss blew up to 7.5e7 without turning non-finite is left out of the fit."""
    results = _sweep(lambda w, t: -8.0, seeds=2)
    blown_up = next(r for r in results if r["config"]["optim"]["lr"] == 2.0**-7
                    and r["config"]["train"]["seed"] == 0)
    blown_up["val_loss"] = 7.5e7
    (shape,) = analyze(results)["shapes"]
    point = next(p for p in shape["curve"] if p["log2_lr"] == -7.0)
    assert (point["n"], point["diverged"]) == (1, 1)
    assert abs(shape["optimum"]["log2_lr"] + 8.0) < 0.1 and shape["optimum"]["loss"] < 2.1
