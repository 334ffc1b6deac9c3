"""The package layers (docs/architecture.md), enforced by the import-linter contracts in pyproject.toml."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

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


# (file, a line that breaks a layer, the contract that must report it); the cycle contract
# names the import as ".fits -> .analysis"
BACK_IMPORTS = {
    "models_to_scaling": ("models/mlp.py", "import scaling.config",
                          "models import only jax and flax"),
    "optim_to_models": ("optim/build.py", "from models.tagged import tree_from_paths",
                        "optim imports only jax and optax"),
    "kernels_to_optim": ("optim/kernels/fused.py", "import optim.orthogonalize",
                         "optim.kernels imports only jax"),
    "scaling_to_experiments": ("scaling/transfer.py", "import experiments.compose",
                               "scaling is library code"),
    "science_to_training": ("scaling/coord_check.py", "import scaling.training.loop",
                            "the science in scaling does not import its training runtime"),
    "cycle": ("scaling/fits.py", "import scaling.analysis",  # analysis imports fits
              "no import cycle among the modules of a package"),
}


def test_every_back_import_breaks_its_contract(tmp_path):
    """A copy of the tree with one deliberate back-arrow per contract fails `lint-imports`,
    which names each broken contract and the module that broke it."""
    for package in PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    for file, line, _ in BACK_IMPORTS.values():
        target = tmp_path / file
        target.write_text(target.read_text() + f"\n{line}  # a deliberate back-arrow\n")

    proc = _lint_imports(tmp_path)
    assert proc.returncode != 0, proc.stdout
    assert f"{len(BACK_IMPORTS)} broken" in proc.stdout, proc.stdout
    for file, _, contract in BACK_IMPORTS.values():
        assert f"{contract}" in proc.stdout and "BROKEN" in proc.stdout, proc.stdout
        module = file.removesuffix(".py").replace("/", ".")
        assert module in proc.stdout or f".{module.rsplit('.')[-1]} -> " in proc.stdout, (
            module, proc.stdout)


def test_the_science_contract_lists_every_module_but_the_runtime():
    """The contract that keeps scaling's science off its training runtime names every module
    of scaling except scaling.training: a new module is listed, or the test says which."""
    import tomllib

    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = [c for c in config["contracts"]
                   if c.get("forbidden_modules") == ["scaling.training"]]
    modules = {f"scaling.{p.stem}" for p in (REPO / "scaling").iterdir()
               if (p.suffix == ".py" and p.stem != "__init__")
               or (p.is_dir() and (p / "__init__.py").exists())}
    assert set(contract["source_modules"]) == modules - {"scaling.training"}
