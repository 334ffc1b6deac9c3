"""Transfer across depth, worked by hand: Depth-μP and CompleteP move per-group multipliers and
never the base LR (docs/rules.md: depth), HyperP moves the base LR by η × (L0/L)^d, SP and μP
copy it; `scaling-transfer --depth` on a synthetic depth sweep, its overrides composing back to
the target, and its one-line errors."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pytest
import yaml
from synthetic import assert_one_line_cli_error, run_result, write_results

from experiments.compose import compose, to_run_config
from experiments.transfer import command_overrides, main
from optim import optimizer_config
from scaling.analysis import analyze
from scaling.config import ConfigError, ModelConfig, ParamConfig, RunConfig, TrainConfig
from scaling.transfer import proxy_shape, transfer

PROXY_LR = 2.0**-7
WIDTH, BASE_WIDTH, BASE_DEPTH = 64, 32, 2


def _proxy(param: str, optim: str = "adamw", depth: int = 2) -> RunConfig:
    return RunConfig(model=ModelConfig(width=WIDTH, depth=depth),
                     param=ParamConfig(name=param, base_width=BASE_WIDTH, base_depth=BASE_DEPTH),
                     optim=optimizer_config(optim, lr=PROXY_LR),
                     train=TrainConfig(steps=100, batch_size=8, seq_len=64))


# Depth 2 → 8 over base depth 2 (r = 1 → 4) at width 64 over base width 32 (m = 2): hidden
# matrices in blocks keep μP's Adam 1/m = 1/2 and take r^(α−1) on top, block vectors r^(α−1).
# Depth-μP (α = 1/2): 4^(−1/2) = 1/2; CompleteP (α = 1): 4^0 = 1; SP and μP: no depth factor.
DEPTH_MULTIPLIERS = {
    "sp": {"hidden.block": (1.0, 1.0), "vector.block": (1.0, 1.0)},
    "mup": {"hidden.block": (0.5, 0.5), "vector.block": (1.0, 1.0)},
    "depth_mup": {"hidden.block": (0.5, 0.25), "vector.block": (1.0, 0.5)},
    "completep": {"hidden.block": (0.5, 0.5), "vector.block": (1.0, 1.0)},
}


@pytest.mark.parametrize("param", sorted(DEPTH_MULTIPLIERS))
def test_depth_moves_multipliers_never_the_base_lr(param):
    proxy = _proxy(param)

    result = transfer(proxy, PROXY_LR, depth=8)

    assert result.lr == PROXY_LR
    assert result.config == dataclasses.replace(
        proxy, model=dataclasses.replace(proxy.model, depth=8))
    outside_blocks = {"input": (1.0, 1.0), "output": (1.0, 1.0), "vector": (1.0, 1.0)}
    assert result.role_multipliers == {**outside_blocks, **DEPTH_MULTIPLIERS[param]}
    _, depth, _ = result.reasons  # proxy, the depth rule, target: nothing else moved
    assert depth.startswith("depth 2 → 8 blocks")
    if param in ("depth_mup", "completep"):
        alpha = {"depth_mup": "0.5", "completep": "1"}[param]
        assert all(s in depth for s in ("r = 1 → 4 over base depth 2", f"α = {alpha}",
                                        f"the {param} table", "base LR stays"))
    else:
        label = {"sp": "SP", "mup": "μP"}[param]
        assert f"{label} has no depth rule" in depth and "expected to move" in depth


def test_depth_and_width_together_multiply():
    """Depth-μP, width 64 → 256 (m = 2 → 8) and depth 2 → 8: hidden.block 1/2 → 1/8 · 1/2."""
    result = transfer(_proxy("depth_mup"), PROXY_LR, width=256, depth=8)

    assert result.lr == PROXY_LR
    assert result.role_multipliers["hidden.block"] == (0.5, 1 / 16)
    assert [r.split(" ")[0] for r in result.reasons[1:3]] == ["width", "depth"]


@pytest.mark.parametrize("optim", ["muonh", "adamw"])
@pytest.mark.parametrize("exponent, factor", [(0.5, 1 / 2), (1.0, 1 / 4), (0.0, 1.0)])
def test_hyperp_depth_law(optim, exponent, factor):
    """η × (L0/L)^d with L0/L = 2/8: d = 0.5 halves η, d = 1 quarters it, d = 0 keeps it."""
    result = transfer(_proxy("hyperp", optim), PROXY_LR, depth=8, depth_exponent=exponent)

    assert result.lr == pytest.approx(PROXY_LR * factor, rel=1e-12)
    (depth,) = [r for r in result.reasons if r.startswith("depth")]
    if exponent:
        assert f"η × (L0/L)^{exponent:g} = ×{factor:.4g}" in depth and "HyperP" in depth
        assert "assumption to measure" in depth
    else:
        assert "no depth factor, so the base LR is copied" in depth and "HyperP" in depth
    # no per-group depth multipliers under HyperP: only the base LR moves
    assert all(before == after for before, after in result.role_multipliers.values())


def test_hyperp_moves_its_base_lr_by_its_law_across_width():
    """HyperP's default law is its reference code's √(d0/d): width 64 → 256 halves η; with the
    tables alone (--law tables) the base LR stays, as HyperP's one-LR claim would have it."""
    result = transfer(_proxy("hyperp", "muonh"), PROXY_LR, width=256)
    assert result.lr == pytest.approx(PROXY_LR / 2, rel=1e-12)
    (width,) = [r for r in result.reasons if r.startswith("width")]
    assert "the archscale law moves the base LR: η × (w0/w)^0.5 = ×0.5" in width

    tables = transfer(_proxy("hyperp", "muonh"), PROXY_LR, width=256, law="tables")
    assert tables.lr == PROXY_LR
    (width,) = [r for r in tables.reasons if r.startswith("width")]
    assert "base LR stays" in width and "HyperP claims its base LR transfers across width" in width


@pytest.mark.parametrize("param, optim", [("completep", "adamw"), ("hyperp", "muonh"),
                                          ("hyperp", "adamw"), ("depth_mup", "sgd")])
def test_depth_target_overrides_compose_back(param, optim):
    target = transfer(_proxy(param, optim), PROXY_LR, width=128, depth=8, steps=200).config

    overrides = command_overrides(target)

    composed = to_run_config(compose(overrides))
    assert dataclasses.replace(composed, logging=target.logging, sweep=target.sweep) == target
    assert "model.depth=8" in overrides and "param.base_depth=2" in overrides


def test_proxy_shape_picks_the_deepest_interior_optimum(tmp_path):
    analysis = analyze(_results({("completep", 2): -7.25, ("completep", 4): -7.25,
                                 ("completep", 8): -3.0}, tmp_path))  # depth 8: on the edge

    assert proxy_shape(analysis)["depth"] == 4
    assert proxy_shape(analysis, depth=2)["depth"] == 2
    with pytest.raises(ConfigError) as error:
        proxy_shape(analysis, depth=3)
    assert error.value.field == "proxy_depth" and "[2, 4, 8]" in str(error.value)


# A synthetic depth sweep: losses are parabolas in log2 LR with a known vertex per (param, depth).
LOG2_LR_GRID = [-10 + 0.5 * i for i in range(13)]
OPTIMUM = -7.25


def _results(vertices: dict[tuple[str, int], float], root: Path) -> list[dict]:
    optim = {"hyperp": "muonh"}
    results = []
    for (param, depth), vertex in vertices.items():
        for log2_lr in LOG2_LR_GRID:
            for seed in (0, 1):
                loss = 1.2 + 1 / depth + 0.05 * (log2_lr - vertex - 0.1 * (seed - 0.5)) ** 2
                result = run_result(param, WIDTH, log2_lr, seed, loss, depth=depth,
                                    base_depth=BASE_DEPTH, base_width=BASE_WIDTH, root=root,
                                    group="sweep-d", grid=(LOG2_LR_GRID[0], LOG2_LR_GRID[-1]))
                if param in optim:  # the optimizer its param group defaults to
                    result["config"]["optim"] = dataclasses.asdict(
                        optimizer_config(optim[param], lr=2.0**log2_lr))
                results.append(result)
    return results


@pytest.fixture
def sweep(tmp_path) -> Path:
    root = tmp_path / "sweep"
    write_results(root, _results({(p, d): OPTIMUM for p in ("completep", "hyperp", "mup")
                                  for d in (2, 4)}, root))
    return root


@pytest.mark.parametrize("param, lr_factor, hidden", [
    ("completep", 1.0, r"hidden\.block\s+×0\.5\s+→\s+×0\.5\s"),
    # HyperP's default law (archscale) has no depth factor: the base LR is copied
    ("hyperp", 1.0, r"hidden\.block\s+×1\s+→\s+×1\s"),
    ("mup", 1.0, r"hidden\.block\s+×0\.5\s+→\s+×0\.5\s"),
])
def test_cli_transfers_a_depth_sweep(param, lr_factor, hidden, sweep, capsys):
    """Proxy d4 (the deepest interior optimum) → d8 at the proxy's width; default file name."""
    main([str(sweep), "--param", param, "--depth", "8"])

    printed = capsys.readouterr().out
    assert f"proxy: {param} transformer w64 d4" in printed
    assert "depth 4 → 8 blocks" in printed and "\n  width " not in printed
    assert re.search(hidden, printed), printed
    out = sweep / "analysis" / f"transfer-{param}-w64-d8.yaml"
    assert f"wrote {out}" in printed
    target = to_run_config(compose(yaml.safe_load(out.read_text())))
    assert (target.param.name, target.param.base_depth) == (param, BASE_DEPTH)
    assert (target.model.width, target.model.depth) == (WIDTH, 8)
    assert math.log2(target.optim.lr) == pytest.approx(OPTIMUM + math.log2(lr_factor), abs=0.05)


def test_cli_depth_exponent_and_proxy_depth(sweep, tmp_path, capsys):
    """HyperP from the d2 proxy to d8 with d = 1: η × 2/8."""
    out = tmp_path / "t.yaml"
    main([str(sweep), "--param", "hyperp", "--depth", "8", "--proxy-depth", "2",
          "--depth-exponent", "1", "--out", str(out)])

    printed = capsys.readouterr().out
    assert "proxy: hyperp transformer w64 d2" in printed and "(L0/L)^1 = ×0.25" in printed
    target = to_run_config(compose(yaml.safe_load(out.read_text())))
    assert math.log2(target.optim.lr) == pytest.approx(OPTIMUM - 2, abs=0.05)


@pytest.mark.parametrize("case", ["bad_depth", "nothing_to_transfer", "depth_not_swept",
                                  "negative_depth_exponent"])
def test_cli_depth_errors_are_one_line(case, sweep, tmp_path, capsys):
    argv, named = {
        "bad_depth": (["--depth", "0"], ["model.depth=0", "positive"]),
        "nothing_to_transfer": (["--depth", "4"],
                                ["nothing to transfer", "--depth 4", "--width", "--batch-size"]),
        "depth_not_swept": (["--depth", "8", "--proxy-depth", "3"],
                            ["proxy_depth=3", "[2, 4]"]),
        "negative_depth_exponent": (["--depth", "8", "--depth-exponent", "-1"],
                                    ["depth_exponent=-1"]),
    }[case]

    assert_one_line_cli_error(main, [str(sweep), "--param", "completep", *argv], capsys,
                              "scaling-transfer", named, tmp_path)
