"""scaling-spectral and scaling/spectral_report.py on small synthetic runs: σ_max from a real
checkpoint (against numpy's SVD) or from spectral.jsonl, two runs compared matrix by matrix, a
width sweep's σ ratio per role and its ηλ·steps, and the one-line errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from experiments.spectral import main
from models.config import ModelConfig
from optim import AdamWConfig
from scaling.config import ParamConfig, RunConfig, TrainConfig, to_dict
from scaling.parametrization import build_model
from scaling.spectral import as_matrices, matrix_paths, sigma_names
from scaling.spectral_report import SPECTRAL_LOG, load_run, sweep_report
from scaling.steps import make_step
from scaling.training.checkpoint import Checkpointer
from scaling.training.rundir import run_name

VOCAB = 256


def _config(out_dir: Path, width: int = 32, gamma: float | None = None, seed: int = 0):
    return RunConfig(model=ModelConfig(width=width, depth=2, head_dim=16),
                     param=ParamConfig("mup", base_width=32),
                     optim=AdamWConfig(weight_decay=0.5, wd_width_exponent=gamma,
                                       schedule="constant", warmup_steps=0),
                     train=TrainConfig(steps=10, seed=seed, out_dir=str(out_dir)))


def _finish(cfg: RunConfig, sigma: dict | None = None) -> Path:
    """A run directory with result.json, and spectral.jsonl when `sigma` is given."""
    run_dir = Path(cfg.train.out_dir) / run_name(cfg)
    run_dir.mkdir(parents=True)
    if sigma is not None:
        rows = [{"step": 5, "sigma": {n: -1.0 for n in sigma}}, {"step": 10, "sigma": sigma}]
        (run_dir / SPECTRAL_LOG).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "result.json").write_text(json.dumps(
        {"config": to_dict(cfg), "diverged": False, "name": run_dir.name, "steps": 10}))
    return run_dir


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    """A finished run with only a checkpoint, and its parameters' exact σ_max per matrix."""
    cfg = _config(tmp_path_factory.mktemp("runs"))
    model, parametrization = build_model(cfg.model, cfg.param, VOCAB, cfg.train.seed)
    params = nnx.split(model)[1].to_pure_dict()
    graphdef = nnx.split(model)[0]
    state = make_step(cfg.optim, parametrization, graphdef, total_steps=10).init_state(
        params, cfg.optim.lr)
    run_dir = _finish(cfg)
    checkpointer = Checkpointer(run_dir / "checkpoints")
    checkpointer.save(10, state.as_dict(), {"wall_seconds": 0.0})
    checkpointer.close()
    exact = {}
    for path in matrix_paths(parametrization.specs):
        leaf = params
        for key in path:
            leaf = leaf[key]
        svd = np.linalg.svd(np.asarray(as_matrices(leaf, parametrization.specs[path]),
                                       np.float64), compute_uv=False)[:, 0]
        exact.update(zip(sigma_names(path, parametrization.specs[path]), svd, strict=True))
    return run_dir, exact


def test_sigma_from_the_checkpoint_matches_svd(checkpointed):
    run_dir, exact = checkpointed
    run = load_run(run_dir)
    assert run.source == "checkpoint"
    assert set(run.sigma) == set(exact) and "blocks/wq/1" in exact and "readout" in exact
    assert run.roles["blocks/wq/1"] == "hidden" and run.roles["embed"] == "input"
    for name, value in exact.items():
        assert run.sigma[name] == pytest.approx(value, rel=1e-3), name


def test_two_runs_compared_matrix_by_matrix(checkpointed, tmp_path, capsys):
    """B logs twice A's σ (the last spectral.jsonl row counts): every ratio is 2, in the CSV,
    the printed table and per role."""
    exact = checkpointed[1]
    run_a = _finish(_config(tmp_path), exact)
    run_b = _finish(_config(tmp_path, seed=1), {n: 2 * v for n, v in exact.items()})
    main([str(run_a), str(run_b), "--out", str(tmp_path / "out")])
    rows = list(csv.DictReader((tmp_path / "out" / "compare.csv").open()))
    assert {r["matrix"] for r in rows} == set(exact)
    assert all(float(r["ratio"]) == pytest.approx(2.0, rel=1e-3) for r in rows)
    printed = capsys.readouterr().out
    assert "hidden: B/A geometric mean 2.000" in printed and "(spectral.jsonl)" in printed
    assert (tmp_path / "out" / "compare.png").stat().st_size > 0


def test_a_sweep_reports_the_ratio_per_role_and_the_decay(tmp_path, capsys):
    """σ ∝ width^e per γ (e = γ − 1/2 here), seeds ×1.1 and ÷1.1 around it: the report gives
    ratio 2^e over one doubling per role, and ηλ·steps from μP's hidden AdamW rules (η/m, λ·m^γ)."""
    for gamma in (1.0, 0.0):
        for width in (32, 64):
            for seed, jitter in ((0, 1.1), (1, 1 / 1.1)):
                cfg = _config(tmp_path, width, gamma, seed)
                base = {"embed": 3.0, "blocks/wq/0": 1.5, "blocks/wq/1": 1.2, "readout": 0.7}
                factor = (width / 32) ** (gamma - 0.5) * jitter
                _finish(cfg, {n: v * factor for n, v in base.items()})
    report = sweep_report(tmp_path)
    families = {f["gamma"]: f for f in report["families"]}
    for gamma, f in families.items():
        assert f["widths"] == [32, 64] and f["seeds"] == [2, 2]
        for role in ("input", "hidden", "output"):
            assert f["roles"][role]["ratio"] == pytest.approx(2 ** (gamma - 0.5), rel=1e-6)
        # hidden η = 0.01/m, λ = 0.5·m^γ, 10 constant steps
        expected = [0.01 * 0.5 * 10 * m ** (gamma - 1) for m in (1, 2)]
        assert f["decay"]["eta_lambda_steps"] == pytest.approx(expected)
        assert f["decay"]["integrated"] == pytest.approx(expected, rel=1e-5)
    main(["--sweep", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "γ=1" in printed and "γ=0" in printed and "+0.500" in printed
    for name in ("spectral_sweep.csv", "spectral_sweep.json", "spectral_sweep.png"):
        assert (tmp_path / "analysis" / name).is_file()
    rows = list(csv.DictReader((tmp_path / "analysis" / "spectral_sweep.csv").open()))
    assert len(rows) == 6  # 2 exponents × 3 roles
    assert sorted(float(r["ratio"]) for r in rows) == pytest.approx([2**-0.5] * 3 + [2**0.5] * 3)


@pytest.mark.parametrize("argv, message", [
    (["{tmp}/nowhere", "{tmp}/unfinished"], "RUN_A='{tmp}/nowhere': expected an existing run"),
    (["{tmp}/unfinished", "{tmp}/unfinished"], "expected a finished run: it has no result.json"),
    (["{tmp}/unfinished"], "expected two run directories"),
    (["--sweep", "{tmp}/unfinished"], "expected a folder holding finished runs"),
    (["--sweep", "{tmp}", "{tmp}/unfinished"], "not both"),
])
def test_errors_are_one_line_and_write_nothing(tmp_path, capsys, argv, message):
    (tmp_path / "unfinished" / "checkpoints").mkdir(parents=True)
    with pytest.raises(SystemExit) as exit_:
        main([a.format(tmp=tmp_path) for a in argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("scaling-spectral: error: ") and err.count("\n") == 1
    assert message.format(tmp=tmp_path) in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["checkpoints", "unfinished"]
