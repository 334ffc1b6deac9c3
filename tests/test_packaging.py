"""The installed distribution points at this checkout and provides the `scaling-train` command."""

from __future__ import annotations

import importlib
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["scaling", "optim", "models", "experiments", "configs"])
def test_package_imports_from_this_repository(name):
    """Each top-level import name resolves to this checkout (an editable install), not a copy."""
    module = importlib.import_module(name)
    assert module.__file__ is not None
    assert Path(module.__file__).resolve().is_relative_to(REPO), module.__file__


def test_console_script_is_installed():
    """`scaling-train` is on the environment's bin path and runs experiments.train:main."""
    bin_dir = Path(sys.executable).parent
    found = shutil.which("scaling-train", path=str(bin_dir))
    assert found is not None, f"no scaling-train in {bin_dir}"
    assert "experiments.train" in Path(found).read_text()
