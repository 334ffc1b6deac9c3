"""MeZO's step at inference memory, from the compiled programs' own accounting (memory_analysis):
deterministic, compile-only (benchmarks/mezo_memory.py measures width 512 and depths to 32)."""

from __future__ import annotations

import importlib.util
import sys

import pytest
from conftest import REPO

# benchmarks/ is not an installed package: load the benchmark from its file, so its programs are
# the ones tested
_spec = importlib.util.spec_from_file_location("mezo_memory",
                                               REPO / "benchmarks" / "mezo_memory.py")
mezo_memory = sys.modules["mezo_memory"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mezo_memory)

# The default model (width 128, depth 4) at 4 × 128 tokens: the forward's temporaries are 1.6×
# the parameters (3.4 MB) and AdamW's 11×, so a copy of the parameters would show in either.
WIDTH, DEPTH, SHALLOW, SEQ_LEN, BATCH = 128, 4, 2, 128, 4
STEP = ("forward", "mezo_estimate", "mezo_update", "adamw")


def measure(depth: int, scan_unroll, programs) -> dict:
    cfg = mezo_memory.model_config(WIDTH, depth, scan_unroll)
    return mezo_memory.measure_shape(cfg, SEQ_LEN, BATCH, programs)[0]


@pytest.fixture(scope="module")
def default_shape() -> dict:
    return measure(DEPTH, True, STEP)


@pytest.fixture(scope="module")
def by_depth(default_shape) -> dict:
    """Temporaries at the two depths: MeZO's estimate under the default (unrolled) model, and
    the naive one-pass program (a rolled model: its growth is the tree-wide copy either way,
    and it compiles faster)."""
    shallow = measure(SHALLOW, True, ("mezo_estimate",))
    naive = {d: measure(d, 1, ("naive_forward",)) for d in (SHALLOW, DEPTH)}
    temporaries = lambda row, name: row["programs"][name]["temporaries"]
    return {"lazy": {SHALLOW: temporaries(shallow, "mezo_estimate"),
                     DEPTH: temporaries(default_shape, "mezo_estimate")},
            "naive": {d: temporaries(row, "naive_forward") for d, row in naive.items()}}


def test_mezo_step_peak_is_a_forward_pass_and_far_below_adamw(default_shape):
    r = default_shape
    assert r["peak_source"] == "summed"  # the CPU backend's own "peak" leaves out temporaries
    # measured 0.93 (the unrolled forward holds a slice per layer; the perturbed ones scan rolled)
    assert r["mezo_over_forward"] <= 1.25, r["peaks"]
    # measured 5.7: AdamW holds θ, m, v and every layer's activations for the backward pass
    assert r["adamw_over_mezo"] >= 4.0, r["peaks"]
    # the update writes into its donated parameters: no second copy of them
    update = r["programs"]["mezo_update"]
    assert update["aliased"] == r["param_bytes"], update
    assert update["peak"] < r["programs"]["mezo_estimate"]["peak"], r["programs"]


def test_mezo_temporaries_are_flat_in_depth_where_naive_perturbation_grows(by_depth):
    layer = mezo_memory.layer_param_bytes(mezo_memory.model_config(WIDTH, DEPTH, True))
    lazy, naive = by_depth["lazy"], by_depth["naive"]
    # lazy: one layer's probe at a time whatever the depth (measured: no growth at all)
    assert abs(lazy[DEPTH] - lazy[SHALLOW]) < layer, (lazy, layer)
    # naive: at least a perturbed copy of every added layer (measured: 2.5 layers' bytes each)
    assert naive[DEPTH] - naive[SHALLOW] >= (DEPTH - SHALLOW) * layer, (naive, layer)
