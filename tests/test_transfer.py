"""Transfer from a tuned proxy: the LR law η = η0·√(B/B0)·(T/T0)^(−0.32) with μP's per-role
width rule (docs/rules.md: μP, HyperP), worked by hand; the overrides it writes compose back to the
target; the proxy it picks from a sweep; and `scaling-transfer` on a synthetic sweep."""

from __future__ import annotations

import dataclasses
import math
import re
import shlex
from pathlib import Path

import pytest
import yaml
from synthetic import assert_one_line_cli_error, run_result, write_results

from experiments.compose import compose, to_run_config
from experiments.transfer import command_overrides, main, plan
from optim import AdamWConfig, SGDConfig, optimizer_config
from scaling.analysis import analyze, load_results
from scaling.config import (
    ConfigError,
    LoggingConfig,
    ModelConfig,
    ParamConfig,
    RunConfig,
    SweepConfig,
    TrainConfig,
    from_dict,
)
from scaling.transfer import proxy_config, proxy_shape, tokens, transfer, transfer_from_sweep

PROXY_LR = 2.0**-7
# tokens ×8 (steps ×4, batch ×2): 2**-7 · 8**-0.32 · 2**0.5, exponents added by hand
TARGET_LR = 2.0 ** (-7 - 0.96 + 0.5)


def _proxy(param: str = "mup", optim: str = "adamw") -> RunConfig:
    return RunConfig(model=ModelConfig(width=64, depth=2),
                     param=ParamConfig(name=param, base_width=32),
                     optim=optimizer_config(optim, lr=PROXY_LR),
                     train=TrainConfig(steps=100, batch_size=8, seq_len=64))


@pytest.mark.parametrize("param, hidden", [("mup", (1 / 2, 1 / 8)), ("sp", (1.0, 1.0))])
def test_hand_computed_transfer(param, hidden):
    """Width 64 → 256 over base width 32, tokens ×8, batch ×2: only four fields move."""
    proxy = _proxy(param)

    result = transfer(proxy, PROXY_LR, width=256, steps=400, batch_size=16)

    assert result.lr == pytest.approx(TARGET_LR, rel=1e-12)
    expected = dataclasses.replace(
        proxy, model=dataclasses.replace(proxy.model, width=256),
        train=dataclasses.replace(proxy.train, steps=400, batch_size=16),
        optim=dataclasses.replace(proxy.optim, lr=result.lr))
    assert result.config == expected
    # μP moves the hidden multiplier (η/m: m = 2 → 8), never the base LR; SP moves nothing
    assert result.role_multipliers == {"input": (1.0, 1.0), "hidden.block": hidden,
                                       "output": (1.0, 1.0), "vector": (1.0, 1.0),
                                       "vector.block": (1.0, 1.0)}

    first, width, tokens, batch, last = result.reasons  # one line per rule, in order
    assert "log2 -7.00" in first and "log2 -7.46" in last
    assert "width 64 → 256" in width
    if param == "mup":
        assert all(s in width for s in ("m = 2 → 8", "base width 32", "per-group multipliers",
                                         "base LR stays"))
    else:
        assert "SP has no width rule" in width
    assert "tokens 51,200 → 409,600 (×8)" in tokens and f"×{8**-0.32:.4g}" in tokens
    assert "batch 8 → 16" in batch and f"×{2**0.5:.4g}" in batch


def test_sgd_mup_multipliers_follow_the_sgd_column():
    """μP SGD: input, output and vector LR η·m; hidden η·fan_out_mult/fan_in_mult = η."""
    result = transfer(_proxy("mup", "sgd"), PROXY_LR, width=256)

    assert result.role_multipliers == {"input": (2.0, 8.0), "hidden.block": (1.0, 1.0),
                                       "output": (2.0, 8.0), "vector": (2.0, 8.0),
                                       "vector.block": (2.0, 8.0)}
    assert result.lr == PROXY_LR


def test_lr_moves_only_with_tokens_and_batch():
    proxy = _proxy()

    width_only = transfer(proxy, PROXY_LR, width=256)
    assert width_only.lr == PROXY_LR
    assert not any(r.startswith(("tokens", "batch")) for r in width_only.reasons)

    # steps ×2, batch ÷2: same tokens, so only the batch rule acts
    same_tokens = transfer(proxy, PROXY_LR, width=256, steps=200, batch_size=4)
    assert same_tokens.lr == pytest.approx(PROXY_LR * 2**-0.5, rel=1e-12)
    assert not any(r.startswith("tokens") for r in same_tokens.reasons)

    no_data_rule = transfer(proxy, PROXY_LR, width=256, steps=400, batch_size=16,
                            data_exponent=0)
    assert no_data_rule.lr == pytest.approx(PROXY_LR * 2**0.5, rel=1e-12)

    assert transfer(proxy, PROXY_LR, width=256, depth=2).lr == PROXY_LR  # the proxy's depth


@pytest.mark.parametrize("kwargs, field", [
    ({"depth": 0}, "model.depth"),
    ({"width": 100}, "model.width"),  # not a multiple of head_dim 32
    ({"width": 256, "data_exponent": -0.32}, "data_exponent"),
    ({"depth": 8, "depth_exponent": -0.5}, "depth_exponent"),
])
def test_refused_transfers_name_the_field(kwargs, field):
    with pytest.raises(ConfigError) as error:
        transfer(_proxy(), PROXY_LR, **kwargs)
    assert error.value.field == field
    assert str(error.value).startswith(f"{field}=")


def _sp_sgd_target() -> RunConfig:
    return RunConfig(model=ModelConfig(width=96, depth=3, readout_init="zero"),
                     param=ParamConfig(name="sp", base_width=32, base_depth=3),
                     optim=SGDConfig(lr=0.05, momentum=0.8, nesterov=True,
                                       schedule="wsd"),
                     train=TrainConfig(steps=50, out_dir="runs/w96,d3"),  # unquoted, a sweep
                     logging=LoggingConfig(group="sweep-x", progress=False),
                     sweep=SweepConfig(log2_lr_min=-8, log2_lr_max=-4))


def _mlp_target() -> RunConfig:
    return RunConfig(model=ModelConfig(kind="mlp", width=200, depth=2, context=16),
                     optim=AdamWConfig(lr=2.0**-9.3, weight_decay=0.1))


@pytest.mark.parametrize("name", ["mup", "sp_sgd", "mlp"])
def test_command_overrides_compose_back_to_the_target(name):
    target = {"mup": lambda: transfer(_proxy(), PROXY_LR, width=256, steps=400,
                                      batch_size=16).config,
              "sp_sgd": _sp_sgd_target, "mlp": _mlp_target}[name]()

    overrides = command_overrides(target)

    composed = to_run_config(compose(overrides))
    assert dataclasses.replace(composed, logging=target.logging, sweep=target.sweep) == target
    groups = [f"model={target.model.kind}", f"param={target.param.name}",
              f"optim={target.optim.name}"]
    assert overrides[:3] == groups
    assert "model.head_dim=32" not in overrides  # the composed default already holds it
    assert not any(o.startswith("sweep.") for o in overrides)
    # of the logging settings only the W&B group travels: the target logs beside its sweep
    assert [o for o in overrides if o.startswith("logging.")] == (
        [f'logging.group="{target.logging.group}"'] if target.logging.group else [])
    assert composed.logging.group == target.logging.group


# A synthetic sweep, built the way tests/test_analyze_cli.py builds one: losses are parabolas in
# log2 LR with a known vertex, one result.json per (width, LR, seed).
LOG2_LR_GRID = [-10 + 0.5 * i for i in range(13)]  # -10 ... -4 in half octaves
SEEDS = (0, 1)
BATCH, SEQ_LEN, DEPTH, STEPS, BASE_WIDTH = 8, 64, 2, 100, 64
OPTIMUM = -7.25  # the vertex, between two grid points
GROUP = "sweep-t"


def _results(vertices: dict[tuple[str, int], float], root: Path) -> list[dict]:
    # seeds put the vertex ±0.05 octave apart; their mean's vertex is `vertex` exactly
    return [run_result(param, width, log2_lr, seed,
                       1.2 + 16 / width + 0.05 * (log2_lr - vertex - 0.1 * (seed - 0.5)) ** 2,
                       steps=STEPS, batch=BATCH, seq_len=SEQ_LEN, depth=DEPTH,
                       base_width=BASE_WIDTH, group=GROUP, root=root,
                       grid=(LOG2_LR_GRID[0], LOG2_LR_GRID[-1]))
            for (param, width), vertex in vertices.items()
            for log2_lr in LOG2_LR_GRID for seed in SEEDS]


def write_sweep(root: Path, vertices: dict[tuple[str, int], float]) -> None:
    write_results(root, _results(vertices, root))


def test_proxy_shape_prefers_the_widest_interior_optimum(tmp_path):
    # width 256's optimum lies above the grid: its argmin is the grid's top edge
    analysis = analyze(_results({("mup", 64): OPTIMUM, ("mup", 128): OPTIMUM,
                                 ("mup", 256): -3.0}, tmp_path))

    shape = proxy_shape(analysis)
    assert (shape["param"], shape["width"]) == ("mup", 128)
    assert shape["optimum"]["log2_lr"] == pytest.approx(OPTIMUM, abs=1e-6)
    assert not shape["optimum"]["on_edge"]
    assert proxy_shape(analysis, width=64)["width"] == 64
    assert proxy_shape(analysis, width=256)["optimum"]["on_edge"]  # asked for, so given
    with pytest.raises(ConfigError) as error:
        proxy_shape(analysis, width=96)
    assert error.value.field == "proxy_width" and "[64, 128, 256]" in str(error.value)


def test_proxy_shape_needs_a_param_when_the_sweep_holds_several(tmp_path):
    analysis = analyze(_results({("mup", 64): OPTIMUM, ("sp", 64): -6.0, ("sp", 128): -7.0},
                                tmp_path))

    with pytest.raises(ConfigError) as error:
        proxy_shape(analysis)
    assert error.value.field == "param" and "['mup', 'sp']" in str(error.value)
    shape = proxy_shape(analysis, param="sp")
    assert (shape["param"], shape["width"]) == ("sp", 128)
    assert shape["optimum"]["log2_lr"] == pytest.approx(-7.0, abs=1e-6)
    with pytest.raises(ConfigError) as error:
        proxy_shape(analysis, param="hyperp")
    assert error.value.field == "param"


@pytest.fixture
def sweep(tmp_path) -> Path:
    root = tmp_path / "sweep"
    write_sweep(root, {("mup", 64): OPTIMUM, ("mup", 128): OPTIMUM})
    return root


def test_cli_writes_overrides_that_compose_to_the_target(sweep, tmp_path, capsys):
    """Proxy w128 (m = 2) → w512 (m = 8), tokens ×2: η = 2**c · 2**-0.32, hidden ×1/2 → ×1/8."""
    out = tmp_path / "target.yaml"

    main([str(sweep), "--width", "512", "--steps", "200", "--out", str(out), "--mesh", "fsdp"])

    printed = capsys.readouterr().out
    assert "proxy: mup transformer w128 d2" in printed
    assert f"fitted log2 LR {OPTIMUM:.2f}" in printed
    assert "width 128 → 512 (m = 2 → 8 over base width 64)" in printed
    assert "tokens 51,200 → 102,400 (×2)" in printed and "\n  batch " not in printed
    assert re.search(r"hidden\.block\s+×0\.5\s+→\s+×0\.125\s", printed), printed
    for role in ("input", "output", "vector", "vector\\.block"):
        assert re.search(rf"{role}\s+×1\s+→\s+×1\s", printed), printed
    assert f"wrote {out}" in printed

    text = out.read_text()
    comments = [line for line in text.splitlines() if line.startswith("#")]
    assert any("tokens 51,200 → 102,400" in line for line in comments)
    overrides = yaml.safe_load(text)
    assert isinstance(overrides, list) and all(isinstance(o, str) for o in overrides)
    assert f"run it: scaling-train {shlex.join(overrides)}" in printed
    target = to_run_config(compose(overrides))
    assert target.mesh.fsdp == -1  # the target's own mesh, not the proxy's
    assert (target.param.name, target.param.base_width) == ("mup", BASE_WIDTH)
    assert (target.model.width, target.model.depth) == (512, DEPTH)
    assert (target.train.steps, target.train.batch_size, target.train.seq_len) == (200, BATCH,
                                                                                  SEQ_LEN)
    assert target.train.out_dir == "runs/transfer"
    assert target.sweep == SweepConfig()  # one run, not the proxy's grid
    assert math.log2(target.optim.lr) == pytest.approx(OPTIMUM - 0.32, abs=0.1)


def test_plan_trains_one_run_in_the_sweeps_group(sweep):
    """What --launch trains: the proxy's config moved, its LR grid dropped, its W&B group kept."""
    shape, result = plan(sweep, width=512, steps=200)

    assert shape["width"] == 128
    assert result.config.sweep == SweepConfig()
    assert result.config.logging.group == GROUP
    assert result.lr == pytest.approx(2.0 ** (OPTIMUM - 0.32), rel=1e-6)


@pytest.mark.parametrize("case", ["missing_dir", "width_not_multiple_of_head_dim",
                                  "param_not_swept"])
def test_cli_errors_are_one_line_and_write_nothing(case, sweep, tmp_path, capsys):
    out = tmp_path / "target.yaml"
    argv, named = {
        "missing_dir": ([str(tmp_path / "nowhere"), "--width", "512"],
                        ["sweep_dir", "nowhere", "expected"]),
        "width_not_multiple_of_head_dim": ([str(sweep), "--width", "100"],
                                           ["model.width=100", "head_dim=32"]),
        "param_not_swept": ([str(sweep), "--width", "512", "--param", "sp"],
                            ["param='sp'", "['mup']"]),
    }[case]

    assert_one_line_cli_error(main, [*argv, "--out", str(out)], capsys, "scaling-transfer", named,
                              tmp_path)


@pytest.mark.parametrize(("kwargs", "field"), [({"steps": 0}, "train.steps"),
                                               ({"batch_size": 0}, "train.batch_size")])
def test_a_zero_target_budget_is_refused_not_ignored(kwargs, field):
    with pytest.raises(ConfigError) as error:
        transfer(_proxy(), PROXY_LR, width=256, **kwargs)
    assert error.value.field == field


def test_library_transfer_starts_from_the_swept_proxy(sweep):
    """The library call gives the CLI's answer: the proxy is the swept run's own config (its
    tokens, base width, optimizer), not RunConfig()'s defaults, which would move the LR."""
    results = load_results(sweep)
    shape, from_library = transfer_from_sweep(results, width=512, steps=200)
    _, from_cli = plan(sweep, width=512, steps=200)
    assert from_library.lr == from_cli.lr and from_library.config == from_cli.config
    proxy = proxy_config(results, shape)
    assert tokens(proxy) != tokens(RunConfig())  # so starting from the defaults would differ
    assert proxy.train == from_dict(results[0]["config"]).train


@pytest.mark.parametrize("scaling, output", [("isotropic", (1.0, 1.0)), ("matched", (2.0, 8.0))])
def test_mezo_transfer_reads_the_table_only_through_matched_probes(scaling, output):
    """MeZO's expected step has per-group LR η·D·U: isotropic probes carry no width rule (the
    transfer must not claim μP's multipliers), matched ones carry μP's SGD column (output ×m)."""
    proxy = dataclasses.replace(_proxy(), optim=optimizer_config(
        "mezo", lr=PROXY_LR, probe_scaling=scaling, update_scaling=scaling))
    result = transfer(proxy, PROXY_LR, width=256)
    assert result.lr == PROXY_LR
    assert result.role_multipliers["output"] == pytest.approx(output)
    assert result.role_multipliers["hidden.block"] == pytest.approx((1.0, 1.0))
    width_reason = result.reasons[1]
    assert ("isotropic probes" in width_reason) == (scaling == "isotropic"), width_reason


def _as_optim(result: dict, name: str, **fields) -> dict:
    """The same synthetic run under another optimizer (its config and run name)."""
    optim = dataclasses.asdict(optimizer_config(name, lr=result["config"]["optim"]["lr"],
                                                **fields))
    label = "-".join([name, *map(str, fields.values())])
    return {**result, "name": result["name"].replace("adamw", label),
            "config": {**result["config"], "optim": optim}}


def test_proxy_shape_needs_an_optimizer_when_the_sweep_holds_several(tmp_path):
    """A sweep of μP under MeZO with isotropic and with matched probes: picking either silently
    would transfer the other recipe's optimum; `optim` names it as the tables do."""
    results = _results({("mup", 64): OPTIMUM}, tmp_path)
    results = ([_as_optim(r, "mezo", probe_scaling="isotropic", update_scaling="isotropic")
                for r in results]
               + [_as_optim(r, "mezo", probe_scaling="matched", update_scaling="matched")
                  for r in _results({("mup", 64): -9.0}, tmp_path)])
    analysis = analyze(results)

    with pytest.raises(ConfigError) as error:
        proxy_shape(analysis)
    assert error.value.field == "optim"
    assert "['mezo[isotropic]', 'mezo[matched]']" in str(error.value)
    shape = proxy_shape(analysis, optim="mezo[matched]")
    assert shape["optimum"]["log2_lr"] == pytest.approx(-9.0, abs=1e-6)
    with pytest.raises(ConfigError, match="optim='adamw': expected one of"):
        proxy_shape(analysis, optim="adamw")
    _, target = transfer_from_sweep(results, optim="mezo[matched]", width=128)
    assert target.config.optim.probe_scaling == "matched"
