"""pyproject.toml and environment.yml must install the same packages (conda users get what pip users get)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).parents[1]


def normalise(requirement: str) -> str:
    name, spec = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*)$", requirement).groups()
    return re.sub(r"[-_.]+", "-", name).lower() + spec.replace(" ", "")


def test_environment_yml_agrees_with_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {normalise(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    listed = {normalise(r) for r in pip_section if not r.startswith("-e")}
    assert listed == wanted, f"only in environment.yml: {listed - wanted}; only in pyproject: {wanted - listed}"
    assert "-e ." in pip_section, "environment.yml must install the project itself"
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python="))
    assert python == "python=3.11"


def test_torch_pins():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch==2.11.0" in deps and "torchaudio==2.11.0" in deps


def test_audiocraft_goes_in_without_its_dependencies_everywhere():
    """AudioCraft's requirements pin torch==2.1.0: its pinned file is installed with --no-deps by the
    Makefile's setup step (re-run when the file changes) and by the conda recipe's documented step."""
    command = "pip install --no-deps -r requirements-audiocraft.txt"
    lines = [line.strip() for line in (ROOT / "requirements-audiocraft.txt").read_text().splitlines()]
    requirements = [line for line in lines if line and not line.startswith("#")]
    assert "audiocraft==1.3.0" in requirements
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[0-9][A-Za-z0-9.]*", r) for r in requirements), requirements
    makefile = (ROOT / "Makefile").read_text()
    stamp_rule = re.search(r"^\$\(STAMP\):(.*)\n((?:\t.*\n)+)", makefile, re.M)
    assert "requirements-audiocraft.txt" in stamp_rule.group(1).split()
    assert re.search(r"-m pip install .*--no-deps .*-r requirements-audiocraft\.txt$", stamp_rule.group(2), re.M)
    assert command in (ROOT / "environment.yml").read_text()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    everything = project["dependencies"] + project["optional-dependencies"]["dev"]
    assert not [r for r in everything if normalise(r).startswith("audiocraft")]  # it would pull its torch pin
    assert any(normalise(r).startswith("flashy") for r in project["optional-dependencies"]["dev"])
