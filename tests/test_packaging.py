"""The installed distribution points at this checkout and provides every command it declares."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from synthetic import call_main

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["scaling", "optim", "models", "experiments", "configs"])
def test_package_imports_from_this_repository(name):
    """Each top-level import name resolves to this checkout (an editable install), not a copy."""
    module = importlib.import_module(name)
    assert module.__file__ is not None
    assert Path(module.__file__).resolve().is_relative_to(REPO), module.__file__


# every command pyproject.toml declares -> its module
SCRIPTS = {name: target.split(":")[0] for name, target in
           tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"].items()}


@pytest.mark.parametrize(("script", "module"), SCRIPTS.items())
def test_console_script_is_installed(script, module, monkeypatch, restore_root_logging):
    """Each command is on the environment's bin path as a wrapper of its module's main, and that
    main answers --help (in this process: a program start each would cost seconds)."""
    bin_dir = Path(sys.executable).parent
    found = shutil.which(script, path=str(bin_dir))
    assert found is not None, f"no {script} in {bin_dir} (re-run pip install -e .)"
    assert module in Path(found).read_text()
    monkeypatch.setattr(sys, "argv", [script])
    code, out = call_main(importlib.import_module(module).main, ["--help"])
    assert code in (0, None) and f"usage: {script}" in out, out


def test_an_installed_command_runs_as_a_program():
    """One of those wrappers, run as a program, answers --help (pip writes every one alike)."""
    found = shutil.which("scaling-train", path=str(Path(sys.executable).parent))
    proc = subprocess.run([found, "--help"], capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 0 and "usage: scaling-train" in proc.stdout, proc.stderr
