"""Offline W&B tracking: the run's config, metrics and group land in the .wandb file, and a
resumed run keeps its id."""

from __future__ import annotations

from pathlib import Path

import pytest
import wandb
from wandb_log import finished_run_records, items, of_type

import scaling.training.data
from experiments.compose import compose, to_run_config
from scaling.config import ConfigError, LoggingConfig
from scaling.training.loop import train
from scaling.training.tracking import wandb_entity, wandb_mode, wandb_project


def _offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


@pytest.fixture
def offline(tiny_run, tmp_path, monkeypatch) -> list[str]:
    """Tiny-run overrides with offline W&B, its files kept under tmp_path."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    return [*tiny_run, "logging.wandb_mode=offline"]


def test_offline_run_records_config_metrics_and_group(offline):
    """An offline run stores the resolved config, every logged metric, the summary and group."""
    result = train(to_run_config(compose([*offline, "logging.group=grp-a"])))

    (offline_dir,) = _offline_runs(Path(result["run_dir"]))
    (log,) = offline_dir.glob("*.wandb")
    records = finished_run_records(log)
    (run,) = of_type(records, "run")
    assert run.run_group == "grp-a" and run.project == "scaling"
    assert run.display_name == result["name"]
    config = items(run.config.update)
    assert config["model"]["width"] == 64 and config["optim"]["lr"] == 0.01
    assert config["train"]["steps"] == 12

    history = [items(h.item) for h in of_type(records, "history")]
    assert [h["_step"] for h in history] == [3, 6, 9, 12]
    assert all("train_loss" in h for h in history)
    assert [h["_step"] for h in history if "val_loss" in h] == [6, 12]
    assert history[-1]["val_loss"] == result["val_loss"]
    summary = {}
    for update in of_type(records, "summary"):
        summary |= items(update.update)
    assert summary["val_loss"] == result["val_loss"] and summary["diverged"] is False
    assert [e.exit_code for e in of_type(records, "exit")] == [0]


def test_resumed_run_keeps_its_wandb_id(offline, monkeypatch):
    """After a crash, re-running the same config continues the same W&B run id."""
    cfg = to_run_config(compose(offline))
    original = scaling.training.data.train_batch

    def crash_at_step_10(tokens, seed, step, batch_size, seq_len):
        if step == 10:
            raise RuntimeError("simulated crash")
        return original(tokens, seed, step, batch_size, seq_len)

    monkeypatch.setattr(scaling.training.data, "train_batch", crash_at_step_10)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg)
    wandb.finish(exit_code=1)  # what W&B's exit hook does when the crashed process ends
    monkeypatch.setattr(scaling.training.data, "train_batch", original)

    result = train(cfg)

    first, second = _offline_runs(Path(result["run_dir"]))
    ids = [of_type(finished_run_records(next(d.glob("*.wandb"))), "run")[0].run_id
           for d in (first, second)]
    assert ids[0] == ids[1]
    assert ids[0] in first.name and ids[0] in second.name
    records = [finished_run_records(next(d.glob("*.wandb"))) for d in (first, second)]
    assert [[e.exit_code for e in of_type(r, "exit")] for r in records] == [[1], [0]]
    steps = [[items(h.item)["_step"] for h in of_type(r, "history")] for r in records]
    assert steps == [[3, 6, 9], [9, 12]]  # the resumed run re-logs from its checkpoint at 6
    assert wandb.run is None


@pytest.mark.parametrize(("env", "override", "expected"), [
    ({}, None, "offline"), ({"WANDB_MODE": "disabled"}, None, "disabled"),
    ({"WANDB_MODE": "online"}, None, "online"), ({"WANDB_MODE": "disabled"}, "offline", "offline"),
    ({"WANDB_MODE": "online"}, "disabled", "disabled")])
def test_wandb_mode_defers_to_the_environment_unless_set(env, override, expected, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert wandb_mode(LoggingConfig(wandb_mode=override)) == expected


def test_project_and_entity_defer_to_the_environment(monkeypatch):
    for key in ("WANDB_PROJECT", "WANDB_ENTITY"):
        monkeypatch.delenv(key, raising=False)
    assert wandb_project(LoggingConfig()) == "scaling" and wandb_entity(LoggingConfig()) is None
    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    monkeypatch.setenv("WANDB_ENTITY", "team")
    assert wandb_project(LoggingConfig()) == "from-env" and wandb_entity(LoggingConfig()) == "team"
    assert wandb_project(LoggingConfig(project="mine")) == "mine"
    assert wandb_entity(LoggingConfig(entity="me")) == "me"


def test_a_bad_wandb_mode_in_the_environment_is_named(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ConfigError, match="WANDB_MODE='sometimes'"):
        wandb_mode(LoggingConfig())


def test_exported_wandb_mode_disabled_logs_nothing(tiny_run, monkeypatch):
    """A user's `export WANDB_MODE=disabled` is obeyed when the config does not set a mode."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    overrides = [o for o in tiny_run if not o.startswith("logging.wandb_mode=")]
    result = train(to_run_config(compose(overrides)))
    assert not (Path(result["run_dir"]) / "wandb").exists()


def test_an_explicit_mode_wins_over_the_environment(offline, monkeypatch):
    """logging.wandb_mode=offline logs although WANDB_MODE=disabled; the project comes from
    WANDB_PROJECT since the config leaves it unset."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    result = train(to_run_config(compose(offline)))
    (offline_dir,) = _offline_runs(Path(result["run_dir"]))
    (run,) = of_type(finished_run_records(next(offline_dir.glob("*.wandb"))), "run")
    assert run.project == "from-env"
