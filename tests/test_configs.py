"""Every shipped config and every documented command line composes into a valid RunConfig."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from experiments.compose import (
    ConfigError,
    compose,
    group_options,
    precheck,
    split_command,
    sweep_points,
    to_run_config,
)
from scaling.config import RunConfig, lr_grid

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
README = REPO / "README.md"
COMMANDS = REPO / "docs" / "commands.md"  # the full command reference the README links to
GROUP_OPTIONS = sorted((folder.name, path.stem) for folder in CONFIGS.iterdir()
                       if folder.is_dir() for path in folder.glob("*.yaml"))
SHELL_OPERATORS = {"|", "||", "&&", ";", "&", ">", ">>", "<", "2>", "2>&1"}
ERROR_PREFIX = "scaling-train: error: "


def test_every_group_has_options():
    """The config tree has the groups the app composes, and Hydra sees the same options."""
    groups = {group for group, _ in GROUP_OPTIONS}
    assert {"model", "param", "optim", "data", "train", "logging"} <= groups
    for group in groups:
        files = sorted(option for g, option in GROUP_OPTIONS if g == group)
        assert group_options(group) == files


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS,
                         ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_every_config_file_composes(group, option):
    """Selecting any option of any group composes and passes validation; an experiment overlay's
    every sweep point (its hydra.sweeper.params) does too."""
    if group == "experiment":  # overlays are added, not chosen: no default in config.yaml
        points = sweep_points([f"+experiment={option}"])
        assert len(points) > 1, f"experiment {option} sweeps nothing"
        seen: set[str] = set()
        for point in points:
            if set(point) <= seen:
                continue  # every value of every swept key is composed at least once
            seen.update(point)
            cfg = to_run_config(compose(point))
            assert lr_grid(cfg.sweep), f"experiment {option} has no LR grid"
        return
    if group == "tune":  # added like an overlay; it sets its field from sweep.multiplier
        cfg = to_run_config(compose([f"+tune={option}", "sweep.multiplier=0.5"]))
        assert getattr(cfg.param, option) == 0.5
        return
    if group == "path":  # added like an overlay: one point of a joint width–depth path
        cfg = to_run_config(compose([f"+path={option}"]))
        assert option == f"w{cfg.model.width}_d{cfg.model.depth}"
        return
    cfg = to_run_config(compose([f"{group}={option}"]))
    assert isinstance(cfg, RunConfig)
    if group in ("model", "param", "optim"):  # their options are named by their kind
        kind = {"model": cfg.model.kind, "param": cfg.param.name, "optim": cfg.optim.name}
        # or, for a model preset (model=modern), built on its kind's file
        preset_of = yaml.safe_load((REPO / "configs" / group / f"{option}.yaml").read_text())
        assert kind[group] == option or kind[group] in preset_of.get("defaults", []), option


def readme_commands(text: str) -> list[tuple[list[str], str | None]]:
    """Arguments after `scaling-train` on each command line inside the fenced code blocks,
    each with the error line the README shows right below it (None when it shows none)."""
    commands, in_block, pending, after_command = [], False, "", False
    for line in text.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            in_block, pending, after_command = not in_block, "", False
            continue
        if not in_block:
            continue
        if after_command and line.startswith(ERROR_PREFIX):
            commands[-1] = (commands[-1][0], line.strip())
        after_command = False
        if line.startswith(ERROR_PREFIX):
            continue
        line = pending + line
        if line.rstrip().endswith("\\"):  # a shell continuation line
            pending = line.rstrip()[:-1] + " "
            continue
        pending = ""
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:
            continue
        if "scaling-train" in tokens:
            args = tokens[tokens.index("scaling-train") + 1:]
            cut = next((i for i, a in enumerate(args) if a in SHELL_OPERATORS), len(args))
            commands.append((args[:cut], None))
            after_command = True
    return commands


def _readme_params():
    """Every command of README.md and docs/commands.md, once each."""
    if not README.exists():
        missing = pytest.mark.skip(reason="README.md not written yet")
        return [pytest.param(None, None, marks=missing)]
    commands = {}
    for doc in (README, COMMANDS):
        for args, error in readme_commands(doc.read_text()) if doc.exists() else []:
            commands.setdefault(" ".join(args) or "(no overrides)", (args, error))
    return [pytest.param(args, error, id=name) for name, (args, error) in commands.items()]


def test_readme_command_parser(tmp_path):
    """The README parser finds commands in fences only, across continuations, and drops flags."""
    readme = tmp_path / "README.md"
    readme.write_text(
        "Run `scaling-train model.width=1` (inline, not a block).\n"
        "```bash\n"
        "scaling-train model.width=256 param=sp\n"
        "$ scaling-train -m optim.lr=1e-3,3e-3 \\\n"
        "    model.width=64,128  # a sweep\n"
        "pip install -e .\n"
        "scaling-train --cfg job | head\n"
        "```\n"
        "scaling-train outside=1\n"
        "```text\n"
        "$ scaling-train model.width=100\n"
        "scaling-train: error: model.width=100: expected a multiple of model.head_dim=32\n"
        "```\n")
    commands = readme_commands(readme.read_text())
    assert commands == [
        (["model.width=256", "param=sp"], None),
        (["-m", "optim.lr=1e-3,3e-3", "model.width=64,128"], None),
        (["--cfg", "job"], None),
        (["model.width=100"],
         "scaling-train: error: model.width=100: expected a multiple of model.head_dim=32")]
    assert split_command(commands[1][0]) == (["optim.lr=1e-3,3e-3", "model.width=64,128"],
                                             True, "config")
    assert split_command(commands[2][0]) == ([], False, "config")


def test_readme_documents_commands():
    """README.md, once written, shows at least one `scaling-train` command in a code block."""
    if not README.exists():
        pytest.skip("README.md not written yet")
    assert readme_commands(README.read_text()), "no `scaling-train` command in README.md"


@pytest.mark.parametrize(("command", "documented_error"), _readme_params())
def test_readme_command_composes(command, documented_error):
    """Every documented command validates, a sweep (with -m) at every value of every key it
    sweeps; a documented error is the exact line the app prints."""
    if documented_error is not None:
        with pytest.raises(ConfigError) as error:
            precheck(command)
        assert f"{ERROR_PREFIX}{error.value}" == documented_error
        return
    overrides, multirun, config_name = split_command(command)
    points = sweep_points(overrides, config_name)
    assert multirun or len(points) == 1, f"a sweep without -m: {command}"
    seen: set[str] = set()
    for point in points:  # every value of every swept key composed at least once
        if set(point) <= seen:
            continue
        seen.update(point)
        assert isinstance(to_run_config(compose(point, config_name)), RunConfig)


@pytest.fixture
def sweep(tiny_run) -> list[str]:
    return [*tiny_run, "optim.lr=1e-3,1e-2"]


def _groups(argv: list[str]) -> list[str]:
    return [a for a in argv if a.startswith("logging.group=")]


def test_precheck_names_a_multirun_group_deterministically(sweep):
    """A multirun gets one `logging.group=sweep-<hash>` that depends on the sweep, not its order."""
    argv = precheck(["-m", *sweep])
    (group,) = _groups(argv)
    assert re.fullmatch(r"logging\.group=sweep-[0-9a-f]{8}", group)
    assert argv[:-1] == ["-m", *sweep]
    assert _groups(precheck(["-m", *sweep])) == [group]
    assert _groups(precheck([*reversed(sweep), "--multirun"])) == [group]
    assert _groups(precheck(["-m", *sweep, "train.seed=1"])) != [group]


def test_precheck_keeps_a_given_group_and_leaves_single_runs_alone(sweep, tiny_run):
    """An explicit logging.group wins; a single run gets no group added."""
    assert _groups(precheck(["-m", *sweep, "logging.group=mine"])) == ["logging.group=mine"]
    single = [*tiny_run, "optim.warmup_steps=2"]
    assert precheck(single) == single


def test_precheck_rejects_a_sweep_without_multirun(sweep):
    """A comma list without -m is an error, not a silent single run."""
    with pytest.raises(ConfigError) as error:
        precheck(sweep)
    assert error.value.field == "overrides"
    assert "optim.lr=1e-3,1e-2" in str(error.value.value)
