"""What `scaling-train` tells a new user: its --help, the hint for an overlay given without `+`,
and that re-running a finished run says it was not retrained."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from synthetic import assert_one_line_cli_error, call_main, run_result

import experiments.finetune
import experiments.train
from experiments.compose import compose, group_options, to_run_config
from scaling.training.loop import member_config
from scaling.training.rundir import run_name


@pytest.fixture
def argv0(monkeypatch):
    """main() hands the command line to Hydra through sys.argv; restored after the test."""
    monkeypatch.setattr(sys, "argv", ["scaling-train"])


@pytest.fixture
def run_main(argv0, restore_root_logging):
    """Calls scaling-train's main; returns (exit code, stdout) (synthetic.call_main)."""

    def run(argv: list[str]) -> tuple[int, str]:
        return call_main(experiments.train.main, argv)

    return run


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_says_what_the_command_does(flag, run_main):
    code, out = run_main([flag])

    assert code == 0
    assert out.startswith("usage: scaling-train")
    assert "-m " in out and "--hydra-help" in out and "--cfg job" in out
    for group in ("model", "param", "optim"):
        assert all(option in out for option in group_options(group)), group
    for overlay in group_options("experiment"):
        assert f"  {overlay} " in out, overlay
    assert "+experiment=NAME" in out
    for field in ("model.width", "model.depth", "optim.lr", "train.steps", "data.path"):
        assert f"  {field} " in out, field


def test_help_names_only_fields_the_config_has():
    """The fields the help lists exist in the composed config, whatever it becomes."""
    config = compose([])
    for field in experiments.train.MAIN_FIELDS:
        group, key = field.split(".")
        assert key in config[group], field


def test_hydra_help_stays_reachable(run_main):
    code, out = run_main(["--hydra-help"])

    assert code == 0 and "Hydra (" in out and "--hydra-help : Hydra's help" in out


def test_experiment_without_plus_hints_at_the_plus(capsys, tmp_path, argv0):
    """`experiment=demo`: one line naming the field and the value, and suggesting +experiment."""
    assert_one_line_cli_error(experiments.train.main, ["experiment=demo"], capsys,
                              "scaling-train", ["experiment='demo'", "+experiment=demo"],
                              tmp_path)


def test_rerunning_a_finished_run_says_it_was_not_retrained(tiny_run, run_main, monkeypatch):
    """A result.json in the run's directory: reported as already finished, nothing trained, the
    file left as it was."""
    cfg = to_run_config(compose(tiny_run))
    run_dir = Path(cfg.train.out_dir) / run_name(member_config(cfg, cfg.optim.lr))
    run_dir.mkdir(parents=True)
    result_file = run_dir / "result.json"
    result_file.write_text(json.dumps(run_result("mup", 64, -6.6, 0, 2.5) | {
        "run_dir": str(run_dir)}))
    saved = result_file.read_bytes()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run must not train again")

    monkeypatch.setattr("scaling.training.loop.make_step", no_training)
    code, out = run_main(tiny_run)

    assert code == 0
    (line,) = out.splitlines()
    assert line.startswith(f"{run_dir}: already finished, not retrained: train_loss=2.51 "
                           "val_loss=2.5")
    assert result_file.read_bytes() == saved


def test_finetune_help_says_what_the_command_does(capsys):
    experiments.finetune.main(["--help"])

    out = capsys.readouterr().out
    assert out.startswith("usage: scaling-finetune")
    assert "init.from_run" in out and "pretrain" in out and "start_val_loss" in out
    assert all(option in out for option in group_options("optim"))
    assert "--hydra-help" in out and "--cfg job" in out


def test_finetune_help_names_only_fields_the_config_has():
    """Each field the help lists is a key of the composed finetune config."""
    config = compose([], "finetune")
    for field in experiments.finetune.MAIN_FIELDS:
        node = config
        for key in field.split("."):
            assert key in node, field
            node = node[key]
