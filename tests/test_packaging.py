"""The installed distribution points at this checkout and provides every command it declares."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

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
def test_console_script_is_installed(script, module):
    """Each command is on the environment's bin path, runs its module's main, and answers --help."""
    bin_dir = Path(sys.executable).parent
    found = shutil.which(script, path=str(bin_dir))
    assert found is not None, f"no {script} in {bin_dir} (re-run pip install -e .)"
    assert module in Path(found).read_text()
    proc = subprocess.run([found, "--help"], capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 0 and f"usage: {script}" in proc.stdout, proc.stderr
