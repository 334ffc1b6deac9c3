"""Coordinate check across depth (docs/rules.md: depth; Tensor Programs VI): under Depth-μP and
CompleteP the residual stream after 3 Adam steps stays within 1.5x across depths 2, 4, 8 and 16
(base depth 2); under μP without a depth rule it grows with depth.

The quantity is `block_out` of the LAST block: the RMS of the residual stream after all L blocks,
the sum that every branch writes into and the readout reads, so it is where a missing depth factor
shows most. (The max over layers is the same number in every measurement below: with pre-norm
blocks the stream grows monotonically through the layers.)

Setup: width 32 = base width, head_dim 8, float32, batch 4 x 16 tokens, AdamW lr 3e-2 constant
without clipping, one fixed batch. The LR is large enough that the 3 updates dominate the stream
(Depth-μP: 1.59 at init -> 3.27 after 3 steps at depth 2). Measured last-layer block_out (depths
2, 4, 8, 16):

    depth_mup  init  1.592 1.599 1.575 1.610  (max/min 1.02)
               step3 3.269 3.170 3.175 2.975  (max/min 1.10)
    completep  init  1.592 1.326 1.165 1.103  (max/min 1.44: at α = 1 the random branches sum
                                               to variance ∝ 1/L, so the stream tends to the
                                               embedding's RMS, 1)
               step3 3.269 2.851 2.622 2.549  (max/min 1.28)
    mup        init  1.592 2.074 2.915 4.335  (max/min 2.72: L random branches add up)
               step3 3.269 6.420 14.54 32.06  (depth 16 / depth 2: 9.8)

At lr 1e-2 the step-3 spreads are 1.06 (depth_mup), 1.43 (completep) and 5.3 (mup): too close to
1.5 for CompleteP, hence 3e-2.

Cost: every depth is a new model to compile (~5 s of one CPU core each from a fresh compilation
cache), so the default suite checks the two ends of the range, depths 2 and 16 (every measured
curve above is monotone in depth, so its ends give its full max/min), and the four depths run as
`slow`. At depth 2 = base depth all three parametrizations are the same program (compiled once).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from optim import AdamWConfig
from scaling.config import ModelConfig, ParamConfig
from scaling.coord_check import DEPTH, CoordStats, depth_check, failures, slope_rows

DEPTHS = [2, 4, 8, 16]  # the full check (slow)
ENDS = [DEPTHS[0], DEPTHS[-1]]  # the default suite's check
BASE_DEPTH, WIDTH = 2, 32
STEPS = 3
FLAT = 1.5  # max/min across an 8x range of depths
B, T, VOCAB = 4, 16, 256
OPTIM = AdamWConfig(lr=3e-2, schedule="constant", warmup_steps=0, clip_norm=0.0)
# a rolled layer loop: compile time flat in depth (depth 16 unrolled costs ~2x)
MODEL = ModelConfig(kind="transformer", width=WIDTH, head_dim=8, compute_dtype="float32",
                    scan_unroll=1)
NAMES = ["depth_mup", "completep", "mup"]


def _check(name: str, depths: list[int]) -> CoordStats:
    tokens_BxT1 = jax.random.randint(jax.random.key(0), (B, T + 1), 0, VOCAB)
    return depth_check(MODEL, ParamConfig(name, base_width=WIDTH, base_depth=BASE_DEPTH), OPTIM,
                       depths, STEPS, (tokens_BxT1[:, :-1], tokens_BxT1[:, 1:]),
                       vocab_size=VOCAB)


@pytest.fixture(scope="module")
def ends() -> dict[str, CoordStats]:
    """Each parametrization at depths 2 and 16."""
    return {name: _check(name, ENDS) for name in NAMES}


def stream(stats: CoordStats, step: int) -> dict[int, float]:
    """depth -> RMS of the last block's output (the residual stream after every block)."""
    return {depth: stats[depth][step][f"block_out/{depth - 1}"] for depth in stats}


def spread(values: dict[int, float]) -> float:
    return max(values.values()) / min(values.values())


def test_depth_check_records_every_depth_step_and_layer(ends):
    """One entry per depth, init plus every step, and one block_out per layer of each depth."""
    for name in NAMES:
        assert sorted(ends[name]) == ENDS
        for depth in ENDS:
            assert sorted(ends[name][depth]) == list(range(STEPS + 1))
            layers = {k for k in ends[name][depth][0] if k.startswith("block_out/")}
            assert layers == {f"block_out/{i}" for i in range(depth)}
            for step_stats in ends[name][depth].values():
                assert all(np.isfinite(v) for v in step_stats.values()), (name, depth)


def test_depth_rules_equal_mup_at_base_depth(ends):
    """At depth 2 = base depth the three runs give the same numbers (r = 1 is μP bit for bit)."""
    base = ends["mup"][BASE_DEPTH]
    assert ends["depth_mup"][BASE_DEPTH] == base
    assert ends["completep"][BASE_DEPTH] == base


def test_updates_matter_at_this_lr(ends):
    """The LR is large enough that 3 steps change the stream substantially (>1.5x at depth 2;
    measured 2.05x), so the flatness below is about the updates, not just the init."""
    after, init = stream(ends["mup"], STEPS), stream(ends["mup"], 0)
    assert after[BASE_DEPTH] / init[BASE_DEPTH] > 1.5, (init, after)


@pytest.mark.parametrize("name", ["depth_mup", "completep"])
def test_depth_rule_stream_flat_across_depth(ends, name):
    """Depth-μP (measured 1.10) and CompleteP (1.28): last block_out after 3 steps within 1.5x
    from depth 2 to 16."""
    values = stream(ends[name], STEPS)
    assert spread(values) < FLAT, values


def test_depth_mup_stream_flat_at_init(ends):
    """Depth-μP's r^(−1/2) branches keep the init stream flat too (measured 1.01 at 2 vs 16)."""
    values = stream(ends["depth_mup"], 0)
    assert spread(values) < FLAT, values


def test_mup_stream_grows_with_depth(ends):
    """Without a depth rule the stream after 3 steps grows by far more than 1.5x from depth 2
    to 16 (measured 9.8x), and by more than at init (2.7x): the updates add up over L blocks."""
    after, init = stream(ends["mup"], STEPS), stream(ends["mup"], 0)
    assert after[16] / after[2] > FLAT, after
    assert after[16] / after[2] > init[16] / init[2], (init, after)


def test_command_depth_check_on_the_ends(ends):
    """scaling-coord-check's check across depth (coord.depths), on the same measurement: the
    slope of log2 RMS against log2 depth of the embedding, the last block's output and the
    logits within ±0.125 passes Depth-μP at every step; μP without a depth rule (not required
    flat) has its stream's slope far beyond (measured +1.11 after 3 steps); CompleteP fails on
    its stream (measured −0.18 at init, −0.12 after 3 steps: it tends to the embedding's RMS
    like 1/L), a finite-depth effect of α = 1 that the check reports rather than hides."""
    rows = slope_rows(ends, DEPTH, MODEL.readout_init)
    failed = {(r.param, r.quantity, r.step) for r in failures(rows, 0.125)}
    assert not any(param == "depth_mup" for param, _, _ in failed), failed
    assert ("completep", "block_out/last", 0) in failed
    stream = {(r.param, r.step): r.slope for r in rows if r.quantity == "block_out/last"}
    assert stream[("mup", STEPS)] > 0.5 and stream[("mup", STEPS)] > stream[("mup", 0)], stream
    assert not any(r.required for r in rows if r.param == "mup" or r.quantity.startswith(
        ("attn_out", "mlp_out", "update/")))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["depth_mup", "completep"])
def test_depth_rule_stream_flat_across_all_depths(name):
    """The full check: last block_out after 3 steps within 1.5x across depths 2, 4, 8 and 16
    (measured 1.10 for Depth-μP, 1.28 for CompleteP), at init too for Depth-μP (1.02)."""
    stats = _check(name, DEPTHS)
    assert sorted(stats) == DEPTHS
    values = stream(stats, STEPS)
    assert spread(values) < FLAT, values
    if name == "depth_mup":
        assert spread(stream(stats, 0)) < FLAT, stream(stats, 0)
