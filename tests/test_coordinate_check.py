"""Coordinate check (docs/rules.md: μP): under μP the RMS of every module's output stays within
1.3x across an 8x range of widths, at init and after 3 Adam steps; under SP it grows with width.

The measurement is `scaling-coord-check` on the Transformer: SP and μP side by side at widths
64–512 (depth 2, head dim 32, base width 64), batch 4 × 32 bytes of the standard library, AdamW
at a constant LR 1e-2 without clipping, 3 steps, each RMS the mean over 3 initializations, with
model.readout_init=normal. Its slopes pass coord.check=true for μP; the tests below read its
stats.json for the spreads (max/min across the widths). Measured over the four widths: μP's block
outputs within 1.21x at every step (after 3 steps attn_out/1 1.16, mlp_out/1 1.17, block_out/1
1.02), SP's grown 16x–33x after 3 steps. The default suite measures the ends of the range, 64 and
512 (every measured curve is monotone in width, so the ends give its max/min); all four widths
run under `-m slow`.

The logits need care. With readout_init='normal' μP keeps the readout *std* constant and multiplies
the logits by 1/m, so the init logits shrink like 1/sqrt(m): sqrt(D) summed O(1/sqrt(base)) terms,
times base/D (measured 2.86 from width 64 to 512, against sqrt(8) = 2.83). Every part of the
logits that involves the random init readout W0 (W0 itself and the hidden change projected on
it) vanishes with width; only the part from the readout's own update is Θ(1). At these widths the
vanishing parts still dominate at width 64, so μP logits after 3 steps are NOT flat with a normal
readout (measured max/min 1.28, their change from init 1.38, falling with width towards a
width-independent value), and the command reports them without checking them. With
readout_init='zero' (the `mup` library's recommendation for Adam, and the command's default)
there is no W0 term and the logits after each step are flat (measured 1.01 after each step by
the library function on a batch of random tokens, one initialization).
"""

from __future__ import annotations

import itertools
import json

import jax
import numpy as np
import pytest
from test_coord_check_cli import (
    ENDS,
    WIDTHS,
    assert_hidden_updates_fall_like_inverse_width,
    assert_mup_passes_and_sp_is_not_flat,
    assert_writes_figures_tables_and_stats,
    run_check,
    slopes,
)

from optim import AdamWConfig
from scaling.config import ModelConfig, ParamConfig
from scaling.coord_check import CoordStats, coordinate_check

STEPS = 3
FLAT = 1.3  # max/min across an 8x width range (docs/rules.md: μP)
B, T, VOCAB = 4, 32, 256
OPTIM = AdamWConfig(lr=1e-2, schedule="constant", warmup_steps=0, clip_norm=0.0)


def _stats(check, param: str) -> CoordStats:
    """One parametrization's measurement from the command's stats.json, keyed by numbers."""
    by_width = json.loads((check.folder / "stats.json").read_text())["stats"]["width"][param]
    return {int(w): {int(step): values for step, values in steps.items()}
            for w, steps in by_width.items()}


@pytest.fixture(scope="module")
def command(tmp_path_factory):
    """scaling-coord-check on the Transformer, SP and μP, a normal readout, check on, at the
    ends of its width range."""
    return run_check(["coord.check=true", "model.readout_init=normal", ENDS,
                      "logging.wandb_mode=disabled"], tmp_path_factory.mktemp("coord"))


@pytest.mark.slow
def test_command_over_its_whole_width_range(tmp_path):
    """The command's own defaults, widths 64, 128, 256 and 512 (slow: twice the default suite's
    compiles): μP passes and SP is not flat at every width, not only at the ends."""
    check = run_check(["coord.check=true", "model.readout_init=normal",
                       "logging.wandb_mode=disabled"], tmp_path)
    assert_mup_passes_and_sp_is_not_flat(check)
    assert sorted(map(int, json.loads((check.folder / "stats.json").read_text())[
        "stats"]["width"]["mup"])) == [64, 128, 256, 512]


@pytest.fixture(scope="module")
def mup(command) -> CoordStats:
    return _stats(command, "mup")


@pytest.fixture(scope="module")
def sp(command) -> CoordStats:
    return _stats(command, "sp")


@pytest.fixture(scope="module")
def mup_zero_readout() -> CoordStats:
    """μP with a zero readout, by the library function on random tokens, one initialization."""
    tokens_BxT1 = jax.random.randint(jax.random.key(0), (B, T + 1), 0, VOCAB)
    model_cfg = ModelConfig(kind="transformer", depth=2, head_dim=32, readout_init="zero")
    return coordinate_check(model_cfg, ParamConfig("mup", base_width=64, base_depth=2), OPTIM,
                            WIDTHS, STEPS, (tokens_BxT1[:, :-1], tokens_BxT1[:, 1:]))


def spread(stats: CoordStats, step: int, module: str) -> float:
    """max/min across the measured widths of one module's RMS at one step."""
    values = [stats[width][step][module] for width in stats]
    return max(values) / min(values)


def _block_modules(stats: CoordStats) -> list[str]:
    names = [k for k in stats[WIDTHS[0]][0] if k.split("/")[0] in ("attn_out", "mlp_out",
                                                                    "block_out")]
    assert len(names) == 3 * 2  # three per layer, depth 2
    return names


def test_coordinate_check_records_every_width_step_and_module(mup_zero_readout):
    """The measurement covers each width, init plus every step, one entry per layer, and from
    step 1 one update per parameter and layer."""
    stats = mup_zero_readout
    assert sorted(stats) == WIDTHS
    for width in WIDTHS:
        assert sorted(stats[width]) == list(range(STEPS + 1))
        for step_stats in stats[width].values():
            assert all(np.isfinite(v) and v >= 0 for v in step_stats.values())
    assert {"embed_out", "logits", "logits_delta"} <= set(stats[WIDTHS[0]][0])
    assert all(stats[width][0]["logits_delta"] == 0.0 for width in WIDTHS)
    updates = set(stats[WIDTHS[0]][1]) - set(stats[WIDTHS[0]][0])
    assert {"update/embed", "update/readout", "update/blocks.wq/1"} <= updates


def test_command_passes_the_check_for_mup_and_sp_is_not_flat(command):
    assert_mup_passes_and_sp_is_not_flat(command)


def test_command_reports_normal_readout_logits_without_checking_them(command):
    """With a normal readout μP's init logits shrink like 1/sqrt(m) by design: slope near −1/2,
    in the table but not checked."""
    unchecked = slopes(command, "mup", checked=False)
    assert -0.6 < unchecked[("logits", 0)] < -0.4, unchecked[("logits", 0)]
    assert ("logits", 0) not in slopes(command, "mup", checked=True)
    assert "logits and logits_delta are reported, not checked" in command.report


def test_hidden_updates_fall_like_inverse_width_under_mup(command):
    assert_hidden_updates_fall_like_inverse_width(command, "transformer")


def test_command_writes_figures_tables_and_stats(command):
    assert_writes_figures_tables_and_stats(command, ("sp", "mup"))


@pytest.mark.parametrize("step", range(STEPS + 1))
def test_mup_block_outputs_flat(mup, step):
    """μP: embed_out, attn_out, mlp_out and block_out of every layer within 1.3x across widths."""
    spreads = {m: spread(mup, step, m) for m in ["embed_out", *_block_modules(mup)]}
    assert max(spreads.values()) < FLAT, spreads


def test_mup_init_logits_shrink_like_inverse_sqrt_width(mup):
    """μP init logits shrink like 1/sqrt(m) by design: RMS(w64)/RMS(w512) near sqrt(8) = 2.83."""
    # Readout std stays 1/sqrt(base_width) while the logits are multiplied by base/width, so the
    # sum over width coordinates grows like sqrt(width) and the product falls like 1/sqrt(m).
    ratio = mup[64][0]["logits"] / mup[512][0]["logits"]
    assert 2.0 <= ratio <= 4.0, ratio


def test_sp_init_logits_flat(sp):
    """SP's fan-in readout init gives width-independent logits at init (unlike μP's)."""
    assert spread(sp, 0, "logits") < FLAT


@pytest.mark.parametrize("step", range(1, STEPS + 1))
def test_mup_logits_flat_after_steps_with_zero_readout(mup_zero_readout, step):
    """μP with a zero readout: logits and every block output within 1.3x after each step."""
    modules = ["logits", *_block_modules(mup_zero_readout)]
    spreads = {m: spread(mup_zero_readout, step, m) for m in modules}
    assert max(spreads.values()) < FLAT, spreads


def test_mup_logits_change_does_not_grow_with_width(mup, sp):
    """Normal readout: μP's logit change after 3 steps does not grow with width; SP's does."""
    mup_delta = [mup[width][STEPS]["logits_delta"] for width in WIDTHS]
    sp_delta = [sp[width][STEPS]["logits_delta"] for width in WIDTHS]
    assert all(a >= b for a, b in itertools.pairwise(mup_delta)), mup_delta
    assert sp_delta[-1] / sp_delta[0] > FLAT, sp_delta


def test_sp_activations_blow_up_after_steps(sp):
    """SP: after 3 Adam steps some block output and the logits grow by more than 1.3x."""
    spreads = {m: spread(sp, STEPS, m) for m in _block_modules(sp)}
    assert max(spreads.values()) > FLAT, spreads
    logits = [sp[width][STEPS]["logits"] for width in WIDTHS]
    assert logits[-1] / logits[0] > FLAT, logits


def test_sp_fails_the_check_when_held_to_mups_claim(command):
    """By default SP is the contrast (its rule claims no flatness); coord.require_flat=[sp, mup]
    holds it to μP's claim, and then its slopes fail the check where μP's pass."""
    from scaling.coord_check import WIDTH, CoordConfig, failures, slope_rows, verdict

    tolerance = CoordConfig().tolerance  # the command's default
    stats = {param: _stats(command, param) for param in ("sp", "mup")}
    default = slope_rows(stats, WIDTH, "normal")
    held = slope_rows(stats, WIDTH, "normal", ("sp", "mup"))
    assert not failures(default, tolerance)
    failed = failures(held, tolerance)
    assert failed and {r.param for r in failed} == {"sp"}
    assert "(checked): FAIL" in verdict(held, WIDTH, "sp", tolerance)
    assert "(not required flat): not flat" in verdict(default, WIDTH, "sp", tolerance)
