"""`scaling-finetune`: a finished run's last weights trained further with another optimizer on
other data; its source pretrained first when none is given; the start (step 0) on record."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import TINY_RUN
from synthetic import assert_one_line_cli_error, call_main

import experiments.finetune
from experiments.compose import compose, to_run_config
from experiments.finetune import plan
from scaling.config import ConfigError
from scaling.files import read_jsonl
from scaling.training.checkpoint import Checkpointer
from scaling.training.loop import train
from scaling.training.replay import replay_run
from scaling.training.rundir import run_name

MODEL = [o for o in TINY_RUN if o.startswith(("model.", "param."))]
LOGGING = [o for o in TINY_RUN if o.startswith("logging.")]
TRAIN = [o for o in TINY_RUN if not o.startswith(("model.", "param."))]


def _hydra_list(overrides: list[str]) -> str:
    return "[" + ",".join(f"'{o}'" for o in overrides) + "]"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> dict:
    """A finished tiny AdamW run on half_a of the standard library: the result.json."""
    out_dir = tmp_path_factory.mktemp("source")
    return train(to_run_config(compose([*TINY_RUN, "data=half_a", f"train.out_dir={out_dir}"])))


@pytest.fixture
def run_main(monkeypatch, restore_root_logging):
    """Calls scaling-finetune's main; returns (exit code, stdout)."""
    monkeypatch.setattr(sys, "argv", ["scaling-finetune"])

    def run(argv: list[str]) -> tuple[int, str]:
        return call_main(experiments.finetune.main, argv)

    return run


def test_pretrains_its_source_then_fine_tunes_and_reports_the_start(tmp_path, run_main,
                                                                      monkeypatch):
    """No init.from_run: the source is scaling-train's run of the `pretrain` overrides (plus the
    command line's model, param and logging), trained first; the fine-tune (MeZO on half_b) starts from
    its weights, logs their validation loss at step 0 and reports start and end. Again: both
    are reported as finished, nothing is trained. The given `pretrain` list keeps the
    defaults it does not name: the source still lands in OUT_DIR/pretrain."""
    out_dir = tmp_path / "runs"
    pretrain = ["data=half_a", *TRAIN]
    argv = [*TINY_RUN, f"train.out_dir={out_dir}", f"pretrain={_hydra_list(pretrain)}"]
    code, out = run_main(argv)

    assert code == 0, out
    pretrain = [f"train.out_dir={out_dir}/pretrain", *pretrain]  # the kept default first
    source_cfg = to_run_config(compose([*MODEL, *pretrain]))  # what scaling-train would train
    source_dir = out_dir / "pretrain" / run_name(source_cfg)
    source_result = json.loads((source_dir / "result.json").read_text())
    assert source_result["config"]["data"]["packages"] == "half_a"
    (run_dir,) = [p for p in out_dir.iterdir() if p.name != "pretrain"]
    result = json.loads((run_dir / "result.json").read_text())
    assert result["config"]["init"]["from_run"] == str(source_dir)
    assert result["config"]["optim"]["name"] == "mezo"
    assert result["config"]["data"]["packages"] == "half_b"
    assert result["config"]["model"] == source_result["config"]["model"]
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert records[0] == {"step": 0, "tokens": 0, "val_loss": result["start_val_loss"]}
    assert [r["step"] for r in records if r["step"] == 0] == [0]
    assert result["val_loss"] == records[-1]["val_loss"] and result["steps"] == 12
    assert (run_dir / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    pretrain_line, source_line, report = out.splitlines()
    # the command line's model, param and logging overrides go to the source too
    assert pretrain_line == ("pretraining the source: scaling-train "
                             f"{' '.join(MODEL + LOGGING + pretrain)}")
    assert source_line.startswith(f"source {source_dir}: val_loss=")
    assert report.startswith(f"{run_dir}: fine-tuning {source_dir.name} with mezo lr=")
    assert f"from {result['start_val_loss']:.4f} (step 0" in report
    assert f"to {result['val_loss']:.4f} (step 12)" in report

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run must not train again")

    monkeypatch.setattr("scaling.training.loop.make_step", no_training)
    code, again = run_main(argv)
    assert code == 0
    source_again, report_again = again.splitlines()
    assert "already finished, not retrained" in source_again
    assert report_again.startswith(f"{run_dir}: already finished, not retrained: fine-tuning")


def test_starts_from_the_source_weights_with_another_optimizer(source, tmp_path):
    """A fine-tune on the source's own data and shape starts at exactly the source's final
    validation loss: its weights, restored through the source's AdamW state into SGD's. Its
    model comes from the source, though the finetune config's default is wider."""
    values = compose([*TRAIN, "data=half_a", "optim=sgd", f"train.out_dir={tmp_path}",
                      f"init.from_run={source['run_dir']}"], "finetune")
    assert values["model"]["width"] != source["config"]["model"]["width"]
    cfg = plan(values, []).finetune
    assert cfg.model.width == source["config"]["model"]["width"]

    result = train(cfg)

    assert result["start_val_loss"] == source["val_loss"]
    assert result["val_loss"] != result["start_val_loss"] and not result["diverged"]


def test_an_interrupted_fine_tune_resumes_to_the_same_losses(source, tmp_path):
    """Stopped after its step-6 checkpoint, a fine-tune resumes from it: the same metrics, bit
    for bit, with one step-0 record."""
    values = compose([*TRAIN, f"train.out_dir={tmp_path}", f"init.from_run={source['run_dir']}"],
                     "finetune")
    cfg = plan(values, []).finetune
    first = train(cfg)
    run_dir = Path(first["run_dir"])
    whole = _deterministic(read_jsonl(run_dir / "metrics.jsonl"))
    (run_dir / "result.json").unlink()
    shutil.rmtree(run_dir / "checkpoints" / "12")

    again = train(cfg)

    assert _deterministic(read_jsonl(run_dir / "metrics.jsonl")) == whole
    assert [r["step"] for r in whole].count(0) == 1
    assert (again["val_loss"], again["start_val_loss"]) == (first["val_loss"],
                                                           first["start_val_loss"])
    # MeZO's log replays from the source's weights to the fine-tuned ones, bit for bit
    replayed = replay_run(run_dir)
    checkpoints = Checkpointer(run_dir / "checkpoints")
    try:
        trained = checkpoints.restore_latest(None)[1]["params"]
    finally:
        checkpoints.close()
    assert jax.tree.all(jax.tree.map(np.array_equal, replayed, trained))


def _deterministic(records: list[dict]) -> list[dict]:
    """Metrics without the wall-clock throughput, which no two runs share."""
    return [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in records]


def test_model_and_param_come_from_the_source_and_must_match_it(source, tmp_path):
    """Fields the command line leaves alone are the source's; one it sets differently is a
    one-line error naming the field, its value and the source's."""
    base = [f"train.out_dir={tmp_path}", f"init.from_run={source['run_dir']}"]
    cfg = plan(compose([*base, "model.compute_dtype=float32"], "finetune"),
               ["model.compute_dtype=float32"]).finetune
    assert cfg.param.base_width == source["config"]["param"]["base_width"]
    for override, named in [("model.width=128", "model.width=128: expected 64"),
                            ("param=sp", "param.name='sp': expected 'mup'"),
                            ("model=mlp", "model.kind='mlp': expected 'transformer'")]:
        with pytest.raises(ConfigError, match="the source run's") as error:
            plan(compose([*base, override], "finetune"), [override])
        assert str(error.value).startswith(named)


def test_a_fine_tune_names_its_source_by_the_source_run_name(source, monkeypatch):
    """The same source reached by another path is the same fine-tune run (directory)."""
    absolute = plan(compose([f"init.from_run={source['run_dir']}"], "finetune"), []).finetune
    run_dir = Path(source["run_dir"])
    monkeypatch.chdir(run_dir.parent)
    relative = plan(compose([f"init.from_run={run_dir.name}"], "finetune"), []).finetune
    assert relative.init.from_run != absolute.init.from_run
    assert run_name(relative) == run_name(absolute)


@pytest.mark.parametrize(("argv", "named"), [
    (["init.from_run=/no/such/run"], ["init.from_run='/no/such/run'", "a finished run"]),
    (["data.path=."], ["data.packages='half_b'", "data.path is set"]),
    (["pretrain=['train.steps=0']"], ["pretrain=", "train.steps=0: expected a positive"]),
    (["optim=nope"], ["optim='nope'", "mezo"]),
])
def test_bad_input_is_one_line_and_writes_nothing(argv, named, capsys, tmp_path, monkeypatch):
    """A run of tiny shape, should the error not come."""
    monkeypatch.setattr(sys, "argv", ["scaling-finetune"])
    assert_one_line_cli_error(experiments.finetune.main,
                              [*TINY_RUN, *argv, f"train.out_dir={tmp_path}"], capsys,
                              "scaling-finetune", named, tmp_path)


def test_a_diverged_source_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "result.json").write_text(json.dumps({"diverged": True}))
    with pytest.raises(ConfigError, match="init.from_run=.*a run that did not diverge"):
        plan(compose([f"init.from_run={run_dir}"], "finetune"), [])
