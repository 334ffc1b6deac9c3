"""The package layers of DESIGN.md, enforced by the import-linter contracts in pyproject.toml."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "optim", "scaling", "experiments", "configs")


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    command = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert command is not None, "lint-imports is missing: pip install -e '.[test]'"
    # PYTHONPATH first, so a copied tree is analysed instead of the installed checkout
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([command, "--no-cache"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=120, check=False)


def test_the_layer_contracts_hold():
    proc = _lint_imports(REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "broken" in proc.stdout and "0 broken" in proc.stdout


# (file, a line that breaks a layer, the contract that must report it)
BACK_IMPORTS = {
    "models_to_scaling": ("models/mlp.py", "import scaling.config",
                          "models import only jax and flax"),
    "optim_to_models": ("optim/build.py", "from models.tagged import tree_from_paths",
                        "optim imports only jax and optax"),
    "kernels_to_optim": ("optim/kernels/fused.py", "import optim.orthogonalize",
                         "optim.kernels imports only jax"),
    "scaling_to_experiments": ("scaling/transfer.py", "import experiments.compose",
                               "scaling is library code"),
}


@pytest.mark.parametrize("case", list(BACK_IMPORTS))
def test_a_back_import_breaks_its_contract(case, tmp_path):
    """A copy of the tree with one deliberate back-arrow fails `lint-imports`, naming it."""
    file, line, contract = BACK_IMPORTS[case]
    for package in PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / file
    target.write_text(target.read_text() + f"\n{line}  # a deliberate back-arrow\n")

    proc = _lint_imports(tmp_path)
    assert proc.returncode != 0, proc.stdout
    assert f"{contract}" in proc.stdout and "BROKEN" in proc.stdout, proc.stdout
    module = file.removesuffix(".py").replace("/", ".")
    assert module in proc.stdout, proc.stdout
