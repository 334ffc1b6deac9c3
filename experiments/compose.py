"""Hydra composition for the entry points and the tests: compose, expand sweeps, pre-validate."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from importlib import resources
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException, OverrideParseException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from optim.config import expected_field
from scaling.config import ConfigError, RunConfig, from_dict

__all__ = ["ConfigError", "check_groups", "compose", "compose_or_explain", "distinct_sources",
           "expand_sweep", "precheck", "split_command", "sweep_points", "to_run_config"]

CONFIG_MODULE = "configs"
# Flags that make Hydra print instead of run: leave those command lines to Hydra untouched.
INFO_FLAGS = {"-h", "--help", "--hydra-help", "-i", "--info", "-c", "--cfg", "-sc",
              "--shell-completion", "--experimental-rerun", "-cp", "--config-path", "-cd",
              "--config-dir"}
FLAGS_WITH_VALUE = {"-cn", "--config-name", "-p", "--package", "-c", "--cfg", "-cp",
                    "--config-path", "-cd", "--config-dir"}
MULTIRUN_FLAGS = {"-m", "--multirun"}
COMMANDS = {"config": "scaling-train", "finetune": "scaling-finetune",
            "coord_check": "scaling-coord-check"}  # the command of each primary config
COMPOSE_ERRORS = (HydraException, OmegaConfBaseException, ValueError)


def parse_overrides(overrides: list[str]) -> list[Override]:
    """Hydra's parse of each override; the first that does not parse is a ConfigError naming it
    (Hydra itself would print a traceback)."""
    parser, parsed = OverridesParser.create(), []
    for override in overrides:
        try:
            parsed += parser.parse_overrides([override])
        except OverrideParseException as error:
            key, _, value = override.partition("=")
            reason = str(error).strip().splitlines()[0]
            hint = (f"; quote each list item that holds '=' or ',': \"{key}=['a=1','b']\""
                    if value.startswith("[") else "")
            raise ConfigError(key, value, f"a value in Hydra's override grammar ({reason})"
                              f"{hint}") from None
    return parsed


def group_options(group: str) -> list[str] | None:
    """Option names of a config group, or None if `group` is not a group."""
    folder = resources.files(CONFIG_MODULE) / group
    if not folder.is_dir():
        return None
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def compose(overrides: list[str], config_name: str = "config") -> dict[str, Any]:
    """The resolved job config (no `hydra` node) as plain dicts, via Hydra's compose API."""
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)


def to_run_config(values: dict[str, Any]) -> RunConfig:
    return from_dict(values)


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """Every point of a Hydra sweep (`a=1,2 b=range(3)`) as a list of plain overrides."""
    choices = []
    for o in parse_overrides(overrides):
        if o.is_sweep_override():
            choices.append([f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()])
        else:
            choices.append([o.input_line])
    return [list(point) for point in itertools.product(*choices)]


def configured_sweep(overrides: list[str], config_name: str = "config") -> dict[str, str]:
    """`hydra.sweeper.params` of the config the overrides select (e.g. from +experiment=...)."""
    plain = [o.input_line for o in parse_overrides(overrides)
             if not o.is_sweep_override()]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=plain, return_hydra_config=True)
    except COMPOSE_ERRORS:  # a bad override: composing its sweep points explains it
        return {}
    params = OmegaConf.select(cfg, "hydra.sweeper.params", default=None)
    return {} if params is None else {k: str(v) for k, v in params.items()}


def sweep_points(overrides: list[str], config_name: str = "config") -> list[list[str]]:
    """Every job of a multirun, combining the config's sweeper params and the command line
    the way Hydra's basic sweeper does: a key given on the command line replaces the config's."""
    configured = configured_sweep(overrides, config_name)
    # keyed without `+`: the config's `+tune` and the command line's `+tune` are one key
    by_key = {key.lstrip("+"): f"{key}={value}" for key, value in configured.items()}
    for o in parse_overrides(overrides):
        by_key[o.key_or_group] = o.input_line
    return expand_sweep(list(by_key.values()))


def check_groups(overrides: list[str]) -> None:
    """Each GROUP=OPTION (or sweep of options) names options of the group that exist."""
    for o in parse_overrides(overrides):
        options = group_options(o.key_or_group)
        if options is None or o.is_delete():
            continue
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.value()]
        for value in values:
            if value not in options:
                raise ConfigError(o.key_or_group, value, f"one of {options}")


def _expected(key: str, value: str, error: Exception, point: list[str], config_name: str) -> str:
    """What an override that Hydra refused should have been."""
    first_line = str(error).strip().splitlines()[0]
    if "No match in the defaults list" in first_line and group_options(key) is not None:
        return f"+{key}={value} (a config group outside the defaults list is added with a `+`)"
    if "not in struct" in str(error) or "Could not override" in first_line:
        if key.startswith("optim."):  # each optimizer has its own fields: name the chosen one
            return expected_field(_chosen_option("optim", point, config_name))
        return f"a key of the config (see `{COMMANDS.get(config_name, 'scaling-train')} --cfg job`)"
    return f"a valid override ({first_line})"


def _chosen_option(group: str, point: list[str], config_name: str) -> str:
    """The option of `group` that the point selects, or the config's default."""
    chosen = [o.split("=", 1)[1] for o in point if o.lstrip("+").split("=", 1)[0] == group]
    return chosen[-1] if chosen else str(compose([], config_name)[group]["name"])


def _group_choices(point: list[str]) -> list[str]:
    return [o for o in point if group_options(o.lstrip("+~").split("=", 1)[0]) is not None]


def compose_or_explain(point: list[str], config_name: str) -> dict[str, Any]:
    try:
        return compose(point, config_name)
    except COMPOSE_ERRORS as whole:  # Hydra's errors are many-lined; find the override to blame
        groups = _group_choices(point)
        # a field override is tried with the point's group choices, so optim=muon's fields exist
        for override in groups + [o for o in point if o not in groups]:
            try:
                compose(groups if override in groups else [*groups, override], config_name)
            except COMPOSE_ERRORS as error:
                key, _, value = override.partition("=")
                parsed = parse_overrides([override])[0]
                typed = value if parsed.is_sweep_override() else parsed.value()
                raise ConfigError(key, typed, _expected(key, value, error, point, config_name)) from None
        raise ConfigError("overrides", " ".join(point),
                          f"a valid combination ({str(whole).strip().splitlines()[0]})") from None


def split_command(args: list[str]) -> tuple[list[str], bool, str]:
    """(job overrides, multirun?, config name) of a command line, without Hydra's own flags."""
    overrides, multirun, config_name, i = [], False, "config", 0
    while i < len(args):
        arg = args[i]
        if arg in FLAGS_WITH_VALUE:
            config_name = args[i + 1] if arg in ("-cn", "--config-name") else config_name
            i += 2
            continue
        if arg in MULTIRUN_FLAGS:
            multirun = True
        elif not arg.startswith("-") and not arg.lstrip("+~").startswith("hydra"):
            overrides.append(arg)
        i += 1
    return overrides, multirun, config_name


def distinct_sources(points: list[list[str]], config_name: str = "config"
                     ) -> Iterator[RunConfig]:
    """The first run config of the sweep points for each distinct (data, train.seq_len): what
    reads each source once."""
    seen = set()
    for point in points:
        cfg = to_run_config(compose_or_explain(point, config_name))
        if (cfg.data, cfg.train.seq_len) not in seen:
            seen.add((cfg.data, cfg.train.seq_len))
            yield cfg


def precheck(argv: list[str]) -> list[str]:
    """Composes and validates every run the command line asks for; returns argv for Hydra.

    For a multirun sweep without `logging.group`, adds a group named after the command so the
    sweep's runs group together in W&B. The sweep includes `hydra.sweeper.params` of the config
    (experiment overlays define their sweeps there).
    """
    if any(a in INFO_FLAGS or a.split("=")[0] in INFO_FLAGS for a in argv):
        return argv
    overrides, multirun, config_name = split_command(argv)
    check_groups(overrides)
    points = sweep_points(overrides, config_name)
    if len(points) > 1 and not multirun:
        swept = sorted({o.split("=")[0] for point in points for o in point
                        if any(o not in other for other in points)})
        raise ConfigError("overrides", " ".join(overrides),
                          f"a single value per key, or -m (--multirun) to sweep {', '.join(swept)}")
    # numpy only: checks each distinct source before any run starts
    from scaling.training import data

    for cfg in distinct_sources(points, config_name):
        data.load(cfg.data, cfg.train.seq_len)
    if multirun and not any(o.lstrip("+").startswith("logging.group=") for o in overrides):
        digest = hashlib.sha256(" ".join(sorted(overrides)).encode()).hexdigest()[:8]
        argv = [*argv, f"logging.group=sweep-{digest}"]
    return argv
