"""Every key of every params/study.yaml block is checked before anything runs: the runner's own blocks
(codec, quantizer, recipe) against their keys and config dataclasses, the notebook blocks (anatomy, audit,
compare) against the parameters cell of their notebook. A bad key is one line naming the block, the key and
the allowed keys, exit code 2."""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

import nbformat
import pytest
import yaml
from conftest import ROOT

from studylib.core import config as cfglib
from studylib.study import plan as plans
from studylib.study import runner


def _params_with(tmp_path: Path, scale: str, edit) -> Path:
    """A copy of params/ whose study.yaml has `edit(scale's settings)` applied."""
    params = tmp_path / "params"
    shutil.copytree(ROOT / "params", params)
    data = yaml.safe_load((params / "study.yaml").read_text())
    edit(data["scales"][scale])
    (params / "study.yaml").write_text(yaml.safe_dump(data))
    return params


def _set(block: str, key: str, value):
    def edit(settings: dict) -> None:
        settings.setdefault(block, {})[key] = value
    return edit


@pytest.mark.parametrize("edit, message", [
    (_set("anatomy", "stepz", 8), "scales.smoke.anatomy.stepz: unknown key; allowed keys: steps, frames, "),
    (_set("anatomy", "out_dir", "x"), "scales.smoke.anatomy.out_dir: unknown key"),  # the runner sets it
    (_set("compare", "focus_kbs", 1.5), "scales.smoke.compare.focus_kbs: unknown key; allowed keys: evaluate, "
                                        "opus_bitrates, focus_kbps"),
    (_set("audit", "arm", ["none"]), "scales.smoke.audit.arm: unknown key; allowed keys: arms, official, threshold, "
                                     "bandwidth"),
    (_set("audit", "runs", ["runs/x"]), "scales.smoke.audit.runs: unknown key"),  # derived from arms
    (_set("recipe", "stepz", 3), "scales.smoke.recipe.stepz: unknown key; allowed keys: arm, steps, valid_every"),
    (_set("codec", "seed", 3), "scales.smoke.codec.seed: unknown key; allowed keys: arms, seeds"),
    (_set("codec", "set", {"stepz": 3}), "scales.smoke.codec (none, seed 0): stepz: unknown key; allowed keys:"),
    (_set("quantizer", "latent_from", "none"), "scales.smoke.quantizer.latent_from: unknown key; allowed keys: "
                                               "latents_from, base, grid"),
    (_set("quantizer", "base", {"n_qq": 2}), "scales.smoke.quantizer: n_qq: unknown key; allowed keys:"),
    (_set("anatomy_", "steps", 8), "scales.smoke.anatomy_: unknown key; allowed keys: corpus"),
])
def test_a_bad_key_in_any_block_is_a_one_line_error_before_anything_runs(tmp_path, capsys, edit, message):
    params = _params_with(tmp_path, "smoke", edit)
    with pytest.raises(plans.StudyError, match=re.escape(message)):
        plans.plan_study("smoke", tmp_path / "results", params, data=tmp_path / "data")
    results = tmp_path / "results"
    code = runner.cli(["--scale", "smoke", "--results", str(results), "--params", str(params),
                      "--data", str(tmp_path / "data")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("studylib study: ") and message in err, err
    assert len(err.splitlines()) == 1
    assert not results.exists() and not (tmp_path / "data").exists()


@pytest.mark.parametrize("scale", ["smoke", "cpu", "gpu"])
def test_the_committed_blocks_are_valid(scale):
    settings = plans.load_study(ROOT / "params" / "study.yaml", scale)
    plans.check_notebook_blocks(scale, settings)


@pytest.mark.parametrize("name", plans.NOTEBOOKS)
def test_papermill_sees_every_assignment_of_each_parameters_cell(name):
    """papermill's line parser skips lines it cannot read (e.g. a comment holding ' = '): such a parameter could
    neither be checked nor injected."""
    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    assigned = [t.id for node in ast.parse(cell.source).body if isinstance(node, ast.Assign) for t in node.targets]
    assert plans.notebook_parameters(ROOT / "notebooks" / f"{name}.ipynb") == tuple(assigned)


def test_a_cell_parameter_its_notebook_lacks_is_refused(tmp_path):
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('out_dir = "."\nsteps = 3')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "nb.ipynb")
    plans._check_cells_against_notebooks("t", [plans.Cell("a", "nb", {"out_dir": "x", "steps": 1, "progress": False})],
                                         tmp_path)  # the runner's common keys may be left out
    with pytest.raises(plans.StudyError, match="b: nb has no parameter 'stepz'; its parameters: out_dir, steps"):
        plans._check_cells_against_notebooks("t", [plans.Cell("b", "nb", {"stepz": 1})], tmp_path)


@pytest.mark.parametrize("old, new, message", [
    ("compare: {focus_kbps: 1.5}", "compare: {focus_kbps: abc}",
     "scales.smoke.compare.focus_kbps: got 'abc', allowed a number >= 0"),
    ("anatomy: {steps: 8}", "anatomy: {steps: -5}", "scales.smoke.anatomy.steps: got -5, allowed an integer >= 0"),
    ("evaluate: {per_kind: 3,", "evaluate: {per_kind: -3,",
     "scales.smoke.codec.evaluate.per_kind: got -3, allowed an integer >= 1"),
    ("seconds: 2.0}", "seconds: -2.0}", "scales.smoke.codec.evaluate.seconds: got -2.0, allowed a number in [0.1, 60]"),
    ("seconds: 2.0}", "seconds: 2.0, bands: 1}", "scales.smoke.codec.evaluate.bands: got 1, allowed true or false"),
    ("compare: {focus_kbps: 1.5}", "compare: {focus_kbps: 1.5, opus_bitrates: abc}",
     "scales.smoke.compare.opus_bitrates: got 'abc', allowed a non-empty list of kbps in [0.5, 256.0]"),
    ("audit: {arms: [upstream, fixed_rel]}", "audit: {arms: [upstream, fixed_rel], threshold: .nan}",
     "scales.smoke.audit.threshold: got nan, allowed a number >= 0"),
])
def test_a_value_a_notebook_would_choke_on_is_refused_before_anything_runs(tmp_path, old, new, message):
    """Issue 36: the notebooks' parameters cells are the schema of every value the runner hands them."""
    params = tmp_path / "params"
    shutil.copytree(ROOT / "params", params)
    text = (params / "study.yaml").read_text()
    assert old in text
    (params / "study.yaml").write_text(text.replace(old, new, 1))
    with pytest.raises(plans.StudyError, match=re.escape(message)):
        plans.plan_study("smoke", params=params)


def test_a_yaml_alias_bomb_is_refused_before_it_expands(tmp_path):
    rows = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    rows += [f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]" for a, b in zip("abcdefgh", "bcdefghi")]
    (tmp_path / "bomb.yaml").write_text("\n".join(rows) + "\n")
    with pytest.raises(cfglib.ConfigError, match="its YAML aliases expand it to over 1,000,000 values"):
        cfglib.read_overlay(tmp_path / "bomb.yaml")
