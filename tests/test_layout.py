"""studylib's layering: the import-linter contract of pyproject.toml holds, there is no import cycle, and the
contract does catch an upward import (it is checked on a copy of the package with one added)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
LAYERS = ["studylib.study", "studylib.analysis", "studylib.training", "studylib.model", "studylib.quantizers",
          "studylib.core"]


def lint_imports(cwd: Path, env_path: Path) -> subprocess.CompletedProcess:
    """`lint-imports` run in `cwd` (its pyproject.toml) on the studylib found first on `env_path`."""
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=cwd, capture_output=True, text=True,
                          env={"PYTHONPATH": str(env_path), "PATH": "/usr/bin:/bin"})


def test_the_contract_names_every_subpackage_top_to_bottom():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = [c for c in config["contracts"] if c["type"] == "layers"]
    assert contract["layers"] == LAYERS
    packages = {f"studylib.{p.name}" for p in (ROOT / "studylib").iterdir() if (p / "__init__.py").is_file()}
    assert packages == set(LAYERS), "every subpackage of studylib is a layer of the contract"


def test_every_layer_imports_only_downward():
    result = lint_imports(ROOT, ROOT)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "0 broken" in result.stdout


def test_no_import_cycles():
    """Strongly connected components of the module import graph (Tarjan): none with more than one module."""
    graph = grimp.build_graph("studylib", cache_dir=None)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for other in graph.find_modules_directly_imported_by(module):
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in on_stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    assert cycles == []


@pytest.mark.slow
def test_an_upward_import_breaks_the_contract(tmp_path):
    """The contract is not vacuous: the quantizer importing the study runner (a copy of the tree) fails it."""
    shutil.copytree(ROOT / "studylib", tmp_path / "studylib", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    ema = tmp_path / "studylib" / "quantizers" / "ema.py"
    ema.write_text(ema.read_text() + "\nfrom studylib.study import runner  # noqa: E402,F401  (deliberately upward)\n")
    result = lint_imports(tmp_path, tmp_path)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout and "studylib.quantizers.ema -> studylib.study.runner" in result.stdout
