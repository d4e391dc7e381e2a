"""The study runner: params grid -> papermill notebooks -> HTML reports and index, on the smoke scale.

The end-to-end test executes every notebook with papermill on params/scales/smoke.yaml (the real `ci` corpus)
and asserts on the files the runs wrote."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from conftest import ROOT

from studylib.analysis import records
from studylib.study import cells, runner
from studylib.study import plan as plans
from studylib.training.run_folder import RunFolder
from studylib.training.train import train_run

NOTEBOOK_DIR = ROOT / "notebooks"


# ------------------------------------------------------------------------------- committed notebooks


@pytest.mark.parametrize("name", plans.NOTEBOOKS)
def test_committed_notebook_is_stripped_and_has_one_parameters_cell(name):
    nb = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), f"{name}: outputs committed"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and tagged[0].cell_type == "code", f"{name}: needs exactly one 'parameters' cell"
    # the parameters cell holds assignments only, so papermill's injected cell can override every one
    for line in tagged[0].source.splitlines():
        assert not line.strip() or line.lstrip().startswith("#") or re.match(r"^\w+ = ", line) or \
            line.startswith((" ", "}", "]")), f"{name}: not an assignment: {line!r}"
    assert nb.metadata.kernelspec.name == "python3"


def test_the_notebook_folder_holds_exactly_the_study_notebooks():
    assert sorted(p.stem for p in NOTEBOOK_DIR.glob("*.ipynb")) == sorted(plans.NOTEBOOKS)


# ------------------------------------------------------------------------------------------ planning


@pytest.mark.parametrize("scale", ["smoke", "cpu", "gpu"])
def test_every_scale_expands_into_valid_runs(scale):
    plan = plans.plan_study(scale, results="results")
    names = [c.name for c in plan.cells]
    assert len(names) == len(set(names))
    listed = plans.load_study(ROOT / "params" / "study.yaml", scale).get("notebooks", plans.NOTEBOOKS)
    assert {c.notebook for c in plan.cells} == set(listed) and plan.results.is_absolute()
    for cell in plan.cells:
        assert set(cell.needs) <= set(names), cell.name
        assert cell.parameters["out_dir"] == str((Path("results") / scale / cell.name).resolve())
    codec = [c for c in plan.cells if c.notebook == "03_train_codec"]
    assert all(re.fullmatch(rf"runs/{c.arm}-[0-9a-f]{{10}}-s{c.seed}", c.name) for c in codec)
    # issue 20's arms: both in the smoke and cpu grids
    alternatives = {"smoke": {"dac", "simvq"}, "cpu": {"dac", "dac_commit16", "simvq"}}.get(scale, set())
    expected = {"none", "upstream", "fixed_abs2", "fixed_rel", "vqtorch"} | alternatives
    assert {c.arm for c in codec} == expected
    compare = next(c for c in plan.cells if c.notebook == "04_compare")
    assert compare.always and set(compare.needs) == set(names) - {compare.name, "07_long_horizon", "08_regimes"}
    horizon = [c for c in plan.cells if c.notebook == "07_long_horizon"]
    if horizon:  # after 04, on the codec runs
        assert horizon[0].always and set(horizon[0].needs) == {c.name for c in codec}
    recipe = [c for c in plan.cells if c.notebook == "06_cpu_recipe"]
    if recipe:  # it shows every seed of the grid's none arm as the chosen recipe
        none_runs = sorted(c.name for c in codec if c.arm == "none")
        assert sorted(recipe[0].needs) == sorted(recipe[0].parameters["chosen_runs"]) == none_runs


def test_the_cpu_scale_runs_three_seeds_per_arm_but_one_of_the_vqtorch_peer():
    codec = [c for c in plans.plan_study("cpu").cells if c.notebook == "03_train_codec"]
    seeds = {arm: sorted(c.seed for c in codec if c.arm == arm) for arm in {c.arm for c in codec}}
    assert seeds == {"none": [0, 1, 2], "upstream": [0, 1, 2], "fixed_abs2": [0, 1, 2], "fixed_rel": [0, 1, 2],
                     "dac": [0, 1, 2], "dac_commit16": [0, 1, 2], "vqtorch": [0],
                     "simvq": [0, 1, 2]}


def test_the_existing_cpu_runs_keep_their_names():
    """New arms and quantizers must not change the config hash (the run folder) of the runs already on disk."""
    planned = {c.name for c in plans.plan_study("cpu").cells if c.notebook == "03_train_codec"}
    assert {"runs/none-64401fb228-s0", "runs/fixed_rel-dd26a9991e-s2", "runs/vqtorch-1f3481f132-s0"} <= planned


def test_only_selects_arms_and_notebooks_and_always_the_comparison():
    plan = plans.plan_study("smoke", only=["fixed_rel", "05_codebook_audit"])
    chosen = {c.notebook if c.notebook != "03_train_codec" else c.arm for c in plan.cells if c.name in plan.selected}
    assert chosen == {"fixed_rel", "05_codebook_audit", "04_compare", "07_long_horizon", "08_regimes"}


def _params_copy(tmp_path: Path, edit) -> Path:
    params = tmp_path / "params"
    shutil.copytree(ROOT / "params", params)
    text = (params / "study.yaml").read_text()
    (params / "study.yaml").write_text(edit(text))
    return params


@pytest.mark.parametrize(
    "edit, args, message",
    [
        (None, ["--scale", "huge"], "--scale: got 'huge', allowed ['cpu', 'gpu', 'long', 'regimes', 'smoke']"),
        (None, ["--only", "fixed"], "--only: 'fixed' matches no run"),
        (None, ["--jobs", "0"], "--jobs: got 0, allowed an integer >= 1"),
        (None, ["--gpus", "0,x"], "--gpus: got '0,x', allowed a comma-separated list"),
        (lambda t: t.replace("cell_timeout_s: 900", "cell_timout_s: 900"), [],
         "scales.smoke.cell_timout_s: unknown key; allowed keys: corpus, train_params, cell_timeout_s"),
        (lambda t: t.replace("arms: [none, upstream, fixed_abs2, fixed_rel, vqtorch, dac, simvq]\n      seeds: [0]\n"
                             "      evaluate: {per_kind: 3", "arms: [none, fixd]\n      seeds: [0]\n      "
                             "evaluate: {per_kind: 3", 1), [], "scales.smoke.codec.arms: 'fixd' unknown; allowed"),
        (lambda t: t.replace("audit: {arms: [upstream, fixed_rel]}", "audit: {arms: [upstream, dac]}", 1), [],
         "scales.smoke.audit.arms: 'dac' (quantizer 'dac') keeps no EMA statistics to audit"),
        (lambda t: t.replace("expiry_every: [1, 5]}", "expiry_every: [0, 5]}", 1), [],
         "expiry_every: got 0, allowed an integer >= 1"),
        (lambda t: t.replace("kmeans_iters: 5, eval_frames", "kmeans_iters: 5, eval_frame", 1), [],
         "eval_frame: unknown key; allowed keys:"),
        (lambda t: t.replace("latents_from: fixed_rel", "latents_from: vqtorch2", 1), [],
         "scales.smoke.quantizer.latents_from: 'vqtorch2' is not among the codec arms"),
        (lambda t: t.replace("raw_sum: {change: \"the weights as a raw sum\", set: {balancer: false}}",
                             "raw_sum: {change: x, set: {balancr: false}}", 1), [],
         "scales.smoke.recipe.variants.raw_sum.set: balancr: unknown key; allowed keys:"),
        (lambda t: t.replace("raw_sum: {change: \"the weights as a raw sum\", set: {balancer: false}}",
                             "raw_sum: {change: x, sett: {}}", 1), [],
         "scales.smoke.recipe.variants.raw_sum.sett: unknown key; allowed keys: change, set"),
        (lambda t: t.replace("      steps: 10\n      valid_every: 5", "      steps: 0\n      valid_every: 5", 1), [],
         "scales.smoke.recipe.steps: got 0, allowed an integer >= 1"),
    ],
)
def test_bad_params_are_one_line_errors_before_anything_runs(tmp_path, capsys, edit, args, message):
    params = _params_copy(tmp_path, edit) if edit else ROOT / "params"
    results = tmp_path / "results"
    code = runner.cli(["--scale", "smoke", "--results", str(results), "--params", str(params),
                      "--data", str(tmp_path / "data"), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("studylib study: ") and message in err, err
    assert len(err.splitlines()) == 1
    assert not results.exists() and not (tmp_path / "data").exists()


# ------------------------------------------------------------------------- failures and skipping


def _notebook(path: Path, source: str) -> None:
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('out_dir = "."\nmarker = "x"')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(source)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def test_a_failing_run_is_recorded_its_dependents_skipped_and_the_others_go_on(tmp_path):
    books = tmp_path / "notebooks"
    books.mkdir()
    _notebook(books / "ok.ipynb", "from pathlib import Path\nPath(out_dir, 'done.txt').write_text(marker)\n"
                                  "import matplotlib.pyplot as plt\nplt.plot([1, 2]); plt.show()")
    _notebook(books / "boom.ipynb", "raise ValueError('boom at ' + marker)")
    results = tmp_path / "results" / "t"
    cells = [plans.Cell("boom", "boom", {"marker": "1"}), plans.Cell("ok", "ok", {"marker": "2"}),
             plans.Cell("after", "ok", {"marker": "3"}, needs=("boom",)),
             plans.Cell("agg", "ok", {"marker": "4"}, needs=("boom", "ok"), always=True)]
    for cell in cells:
        cell.parameters["out_dir"] = str(results / cell.name)
    plan = plans.StudyPlan("t", results, tmp_path / "manifest.csv", None, 120, cells, {c.name for c in cells},
                           notebooks=books)
    plan.manifest.write_text("")  # exists: no corpus to build
    outcome = runner.run_study(plan)
    assert outcome.statuses == {"boom": "failed", "ok": "complete", "after": "skipped", "agg": "complete"}
    assert outcome.failed == ["boom"] and outcome.errors["boom"] == "ValueError: boom at 1"
    assert "needs boom, which is failed" in outcome.errors["after"]
    record = json.loads((results / "boom" / "cell.json").read_text())
    assert record["status"] == "failed" and record["error"] == "ValueError: boom at 1"
    assert (results / "boom" / "report.html").is_file(), "the partial notebook is rendered for reading"
    assert (results / "ok" / "done.txt").read_text() == "2" and (results / "agg" / "done.txt").read_text() == "4"
    page = (tmp_path / "results" / "index.html").read_text()
    assert "boom at 1" in page and 'href="t/boom/report.html"' in page
    # run again: complete cells are skipped, the failed one runs again, the aggregation always runs
    started = {name: json.loads((results / name / "cell.json").read_text())["started"] for name in ("ok", "agg")}
    again = runner.run_study(plan)
    assert again.statuses["boom"] == "failed" and again.statuses["ok"] == "complete"
    assert json.loads((results / "ok" / "cell.json").read_text())["started"] == started["ok"]
    assert json.loads((results / "agg" / "cell.json").read_text())["started"] != started["agg"]


def test_gpus_dispatch_one_run_per_gpu_and_ddp_runs_take_several(tmp_path):
    books = tmp_path / "notebooks"
    books.mkdir()
    _notebook(books / "env.ipynb", "import os, time\nfrom pathlib import Path\n"
                                   "Path(out_dir, 'gpus.txt').write_text(os.environ.get('CUDA_VISIBLE_DEVICES', '-'))\n"
                                   "Path(out_dir, 'threads.txt').write_text(os.environ['OMP_NUM_THREADS'])")
    results = tmp_path / "results" / "g"
    cells = [plans.Cell("a", "env", {}, gpus=1), plans.Cell("b", "env", {}, gpus=1),
             plans.Cell("ddp", "env", {}, needs=("a", "b"), gpus=2), plans.Cell("cpu", "env", {}, needs=("ddp",))]
    for cell in cells:
        cell.parameters["out_dir"] = str(results / cell.name)
    plan = plans.StudyPlan("g", results, tmp_path / "manifest.csv", None, 120, cells, {c.name for c in cells},
                           notebooks=books)
    plan.manifest.write_text("")
    assert set(runner.run_study(plan, jobs=1, gpus=[3, 5]).statuses.values()) == {"complete"}
    seen = {c.name: (results / c.name / "gpus.txt").read_text() for c in cells}
    assert {seen["a"], seen["b"]} == {"3", "5"} and seen["ddp"] in ("3,5", "5,3") and seen["cpu"] == ""
    # two workers share the cores: each gets its part of them as torch threads
    import os

    assert (results / "a" / "threads.txt").read_text() == str(max(1, (os.cpu_count() or 1) // 2))


# --------------------------------------------------------------------------------- the smoke study


@pytest.fixture(scope="module")
def smoke_study(ci_data, tmp_path_factory) -> Path:
    results = tmp_path_factory.mktemp("results")
    code = runner.cli(["--scale", "smoke", "--results", str(results), "--data", str(ci_data)])
    assert code == 0, (results / "smoke" / "study.json").read_text()
    return results


def _hrefs(page: Path) -> list[str]:
    return re.findall(r'href="([^"#]+)"', page.read_text())


def test_smoke_study_runs_every_notebook_and_renders_every_report(smoke_study):
    summary = json.loads((smoke_study / "smoke" / "study.json").read_text())
    assert {c["status"] for c in summary["cells"]} == {"complete"}
    assert {c["notebook"] for c in summary["cells"]} == set(plans.NOTEBOOKS)
    for cell in summary["cells"]:
        folder = smoke_study / "smoke" / cell["name"]
        page = (folder / "report.html").read_text()
        assert re.search(r'<img[^>]*src="data:image/png', page), f"{cell['name']}: no figure in the report"
        assert "Traceback" not in page and "hl-ipython3" not in page, cell["name"]  # no errors, no code
        assert json.loads((folder / "cell.json").read_text())["status"] == "complete"
        assert list(folder.glob("*.png")), f"{cell['name']}: figures must also be files"
        assert (folder / "summary.json").is_file(), cell["name"]
    codec_pages = [smoke_study / "smoke" / c["name"] / "report.html" for c in summary["cells"]
                   if c["notebook"] == "03_train_codec"]
    assert all("<audio" in p.read_text() for p in codec_pages)
    assert "<audio" in (smoke_study / "smoke" / "04_compare" / "report.html").read_text()


def test_index_links_every_report_and_every_link_resolves(smoke_study):
    index = smoke_study / "index.html"
    links = _hrefs(index)
    local = [h for h in links if not h.startswith("http")]
    missing = [h for h in local if not (index.parent / h).is_file()]
    assert local and not missing, missing
    # what git ignores (executed notebooks, logs, checkpoints) must not be linked from a committed index
    assert not [h for h in local if h.endswith((".ipynb", ".log", ".pt"))]
    for name in plans.NOTEBOOKS[:2] + plans.NOTEBOOKS[3:]:
        assert f"smoke/{name}/report.html" in links
    assert sum("smoke/runs/" in h and h.endswith("report.html") for h in links) == 7


def test_smoke_study_writes_tidy_tables(smoke_study):
    root = smoke_study / "smoke"
    for run in root.glob("runs/*"):
        metrics = pd.read_parquet(run / "metrics.parquet")
        assert {"step", "split", "loss", "mel", "l1", "commit", "used_l0", "perplexity_l0", "dead_l0",
                "replaced_l0", "dead_now_l0", "replaced_total_l0"} <= set(metrics.columns)
        items = pd.read_parquet(run / "eval_test.parquet")
        assert {"item", "kind", "bandwidth", "nominal_kbps", "si_sdr", "mel_distance", "visqol_audio"} <= set(items)
        assert set(items.kind) == {"speech", "music"} and items.groupby("bandwidth").size().eq(6).all()
    runs = pd.read_parquet(root / "02_quantizer_study" / "quantizer_runs.parquet")
    assert {"cell", "arm", "variant", "seed", "frames_per_step", "step", "split", "usage_l0", "snr_l1",
            "replaced_total_l0"} <= set(runs.columns)
    assert runs.cell.nunique() == 18 and set(runs.frames_per_step) == {600, 1200}
    summary = pd.read_csv(root / "04_compare" / "codec_summary.csv")
    assert {"arm", "bandwidth_kbps", "si_sdr_db", "si_sdr_db_ci95", "mel_distance", "usage", "perplexity",
            "ci_over"} <= set(summary)
    assert {"upstream", "none", "fixed_abs2", "fixed_rel", "vqtorch", "dac", "simvq"} <= set(summary.arm)
    audit = pd.read_csv(root / "05_codebook_audit" / "audit.csv")
    assert {"checkpoint", "level", "sum", "below", "dead_floor", "eval_usage"} <= set(audit)
    rows = pd.read_parquet(root / "08_regimes" / "regime_rows.parquet")  # the quantizer map and the codec runs
    quantizer = rows[rows.kind == "quantizer"]
    assert quantizer.run.nunique() == 16 and set(quantizer.bins) == {64, 256} and (quantizer.encoder == "frozen").all()
    assert quantizer.groupby("run").step.max().eq(20).all() and quantizer.snr_db.notna().all()
    assert set(rows[rows.kind == "codec"].arm) >= {"none", "fixed_rel"}
    decision = pd.read_csv(root / "08_regimes" / "decision_table.csv")
    assert {"regime", "bins", "n_q", "frames_per_step", "encoder", "steps", "quality_gap", "quality_ci95",
            "verdict", "share_saved"} <= set(decision)
    cells = decision[decision.kind == "quantizer"]
    assert len(cells) == 4 and (cells.seeds == 2).all()


def test_recipe_study_trains_its_variants_and_checks_the_chosen_recipe(smoke_study):
    root = smoke_study / "smoke" / "06_cpu_recipe"
    variants = pd.read_csv(root / "recipe_variants.csv")
    assert list(variants.variant) == ["encodec", "raw_sum"] and (variants.steps == 10).all()
    assert variants[["test_si_sdr_db", "test_mel_distance", "test_perplexity_l0"]].notna().all().all()
    curves = pd.read_parquet(root / "recipe_curves.parquet")
    assert set(curves.variant) == {"encodec", "raw_sum", "chosen recipe"}
    assert {"step", "minutes", "si_sdr_db", "mel_distance", "perplexity_l0"} <= set(curves.columns)
    targets = pd.read_csv(root / "recipe_targets.csv")  # the grid's none run (seed 0), judged on the test windows
    assert len(targets) == 1
    assert {"si_sdr_db_ok", "perplexity_l0_ok", "mel_distance_ok", "meets_targets"} <= set(targets)
    trace = pd.read_csv(root / "signal_trace.csv")
    latent = trace[trace.part == "encoder"].groupby("init").last()
    assert latent.loc["unit_gain", "spread"] >= 0.5 * latent.loc["unit_gain", "std"]
    assert latent.loc["pytorch", "spread"] < 0.05 * latent.loc["pytorch", "std"]
    summary = json.loads((root / "summary.json").read_text())
    assert summary["chosen"]["runs"] == targets.run.tolist() and summary["best_variant"] in ("encodec", "raw_sum")


def test_the_headline_holds_in_the_smoke_study(smoke_study):
    root = smoke_study / "smoke"
    assert json.loads((root / "02_quantizer_study" / "summary.json").read_text())["upstream_identical_to_none"]
    assert json.loads((root / "04_compare" / "summary.json").read_text())["upstream_identical_to_none"]


def test_a_second_invocation_skips_complete_runs(smoke_study, ci_data):
    root = smoke_study / "smoke"
    stamps = {p.parent.name: json.loads(p.read_text())["started"] for p in root.glob("runs/*/cell.json")}
    assert runner.cli(["--scale", "smoke", "--results", str(smoke_study), "--data", str(ci_data),
                      "--only", "fixed_rel"]) == 0
    assert stamps == {p.parent.name: json.loads(p.read_text())["started"] for p in root.glob("runs/*/cell.json")}


def _stale(plan: plans.StudyPlan) -> dict[str, str | None]:
    problems = cells.codec_run_problems(plan, repair=False)
    return {c.name: cells.why_stale(plan, c, problems.get(c.name)) for c in plan.cells if not c.always}


def test_a_results_tree_moved_elsewhere_finds_every_run_complete(smoke_study, ci_data, tmp_path):
    """Issue 36: run records are portable (paths relative to the results, params and repository folders): a
    copy of the finished smoke results, with a copy of the params, in other folders re-runs nothing."""
    moved = tmp_path / "elsewhere" / "results"
    shutil.copytree(smoke_study, moved)
    plan = plans.plan_study("smoke", moved, _params_copy(tmp_path, lambda t: t), data=ci_data)
    stale = _stale(plan)
    assert stale and stale == {name: None for name in stale}
    record = json.loads((moved / "smoke" / plan.cells[1].name / "cell.json").read_text())
    assert str(smoke_study) not in json.dumps(record) and record["parameters"]["out_dir"].startswith("{results}/")


def test_changing_how_runs_execute_neither_retrains_nor_moves_aside_a_complete_run(smoke_study, ci_data, tmp_path):
    """Issue 36: `milestones` and `compile` (like `progress`) say how a run executes, not what it trains
    (NOT_HASHED): the runner leaves a complete run alone, as `studylib train` resumes it, and moves no checkpoint
    aside as 'of another config'."""
    params = _params_copy(tmp_path, lambda t: t.replace("set: {milestones: [10]}",
                                                        "set: {milestones: [10, 15], compile: true}"))
    plan = plans.plan_study("smoke", smoke_study, params, data=ci_data)
    codec = [c for c in plan.cells if c.notebook == "03_train_codec"]
    assert codec[0].parameters["overrides"]["milestones"] == [10, 15]
    problems = cells.codec_run_problems(plan)  # repairs: would move a checkpoint it found of another config aside
    assert not any(problems.values()) and not list(smoke_study.rglob("*.damaged"))
    assert all(cells.why_stale(plan, c, problems.get(c.name)) is None for c in codec)


def test_the_dry_run_says_what_would_run_and_why_and_estimates_it_per_model(smoke_study, ci_data, tmp_path, capsys):
    """Issue 35: per cell what would run and why, an estimate from the finished runs of the same model preset (the
    official architecture steps ~6x slower than the small one: no rate of another preset stands in), nothing run."""
    before = {p: p.stat().st_mtime_ns for p in smoke_study.rglob("*") if p.is_file()}
    more_seeds = _params_copy(tmp_path / "a", lambda t: t.replace("      seeds: [0]\n      evaluate: {per_kind: 3",
                                                                  "      seeds: [0, 1]\n      evaluate: {per_kind: 3"))
    plan = plans.plan_study("smoke", smoke_study, more_seeds, data=ci_data)
    rows = {r["cell"]: r for r in runner.dry_run(plan)}
    codec = [c for c in plan.cells if c.notebook == "03_train_codec"]
    assert {c.seed for c in codec} == {0, 1}
    for cell in codec:
        row = rows[cell.name]
        if cell.seed == 0:
            assert (row["action"], row["why"], row["estimate_s"]) == ("skip", "complete", None)
        else:
            assert (row["action"], row["why"]) == ("run", "missing") and row["estimate_s"] > 0
    other_model = _params_copy(tmp_path / "b", lambda t: t.replace("set: {milestones: [10]}",
                                                                   "set: {milestones: [10], model: small}"))
    plan = plans.plan_study("smoke", smoke_study, other_model, data=ci_data)
    rows = runner.dry_run(plan)
    assert all(r["action"] == "run" and r["estimate_s"] is None for r in rows if r["notebook"] == "03_train_codec")
    runner.print_dry_run(plan, rows, 2)
    out = capsys.readouterr().out
    assert "without an estimate" in out and "nothing was run" in out
    assert {p: p.stat().st_mtime_ns for p in smoke_study.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_train_run_goes_through_torchrun_when_ddp_is_asked(synthetic_manifest, tmp_path):
    import torch
    from conftest import SMOKE

    run_dir = tmp_path / "ddp"
    overrides = {"manifest": str(synthetic_manifest), "progress": False, "steps": 10, "expiry_mode": "fixed",
                 "expiry_threshold": 1.0, "ddp_buffers": "none", "bandwidths": [1.5, 3.0]}
    metrics = train_run([str(SMOKE)], overrides, run_dir, nproc_per_node=2)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["status"] == "complete"
    assert manifest["config"]["bandwidths"] == [1.5, 3.0] and metrics.step.max() == 10
    ranks = [torch.load(run_dir / f"rank{r}_codebooks.pt") for r in (0, 1)]
    for key, value in ranks[0].items():
        assert torch.equal(value, ranks[1][key]), key


# ------------------------------------------------------------------------------------- runs on disk


def _run_folder(root: Path, name: str, manifest: dict | None = None, cell: dict | None = None,
                evaluated: bool = False) -> Path:
    folder = root / "runs" / name
    folder.mkdir(parents=True)
    if manifest is not None:
        (folder / "manifest.json").write_text(json.dumps(manifest))
    if cell is not None:
        (folder / "cell.json").write_text(json.dumps(cell))
    if evaluated:
        for file in RunFolder.TABLES:
            pd.DataFrame({"x": [1]}).to_parquet(folder / file)
    return folder


def test_list_runs_reads_arm_seed_hash_status_and_paths(tmp_path):
    done = _run_folder(tmp_path, "adam_1e-3-0123456789-s2", {"status": "complete", "seed": 2, "config": {"steps": 5}},
                       {"arm": "adam_1e-3", "seed": 2}, evaluated=True)
    _run_folder(tmp_path, "none-abcdefabcd-s0", cell={"arm": "none", "seed": 0, "status": "skipped"})
    _run_folder(tmp_path, "upstream-abcdefabcd-s1", {"status": "failed", "seed": 1})  # no cell.json: the name says
    (tmp_path / "runs" / "stray").mkdir()  # neither manifest nor cell record: not a run
    runs = records.list_runs(tmp_path)
    assert [(r.name, r.arm, r.seed, r.config_hash, r.status) for r in runs] == [
        ("adam_1e-3-0123456789-s2", "adam_1e-3", 2, "0123456789", "complete"),
        ("none-abcdefabcd-s0", "none", 0, "abcdefabcd", "not started"),
        ("upstream-abcdefabcd-s1", "upstream", 1, "abcdefabcd", "failed")]
    assert runs[0].checkpoint == done / "checkpoint.pt" and runs[0].eval_items == done / "eval_test.parquet"
    assert [r.name for r in records.list_runs(tmp_path, evaluated=True)] == ["adam_1e-3-0123456789-s2"]
    table = records.runs_table(runs)
    assert list(table.run) == [r.name for r in runs] and table.steps.iloc[0] == 5
    assert records.list_runs(tmp_path / "nothing") == []


def test_run_tables_and_example_rows_come_from_the_listed_runs(tmp_path):
    a = _run_folder(tmp_path, "none-0123456789-s0", {"status": "complete", "seed": 0}, {"arm": "none"}, evaluated=True)
    b = _run_folder(tmp_path, "upstream-0123456789-s0", {"status": "complete", "seed": 0}, {"arm": "upstream"},
                    evaluated=True)
    for folder, files in ((a, ["speech_01_reference.flac", "speech_01_6kbps.flac", "music_02_reference.flac"]),
                          (b, ["speech_01_6kbps.flac"])):
        (folder / "examples").mkdir()
        for name in files:
            (folder / "examples" / name).write_bytes(b"")
    runs = records.list_runs(tmp_path, evaluated=True)
    table = records.run_tables(runs, "eval_test.parquet")
    assert list(table.arm) == ["none", "upstream"] and list(table.run) == [a.name, b.name]
    assert list(table.seed) == [0, 0]
    rows = records.example_rows(runs, "6kbps")
    assert rows[0] == {"example": "speech_01", "reference": a / "examples" / "speech_01_reference.flac",
                       "none": a / "examples" / "speech_01_6kbps.flac",
                       "upstream": b / "examples" / "speech_01_6kbps.flac"}
    assert rows[1]["example"] == "music_02" and rows[1]["none"] is None and rows[1]["upstream"] is None
    assert records.example_rows([], "6kbps") == []


def test_the_regimes_scale_plans_its_groups_the_fine_tuning_source_first_and_the_map_last():
    plan = plans.plan_study("regimes", results="results")
    codec = [c for c in plan.cells if c.notebook == "03_train_codec"]
    source = codec[0]
    assert source.name == "runs/none-60cda02ae4-s0", "the source keeps the long scale's none-s0 config and name"
    frozen = [c for c in codec if c.parameters["overrides"].get("freeze_encoder")]
    assert {c.arm for c in frozen} == {"none", "fixed_rel"}
    assert all(c.needs == (source.name,) and c.parameters["overrides"]["init_from"].endswith(source.name)
               for c in frozen)
    def group(steps: int, **sets) -> list:
        return sorted((c.arm, c.seed) for c in codec if c.parameters["overrides"].get("bins") == 4096
                      and c.parameters["overrides"]["steps"] == steps
                      and all(c.parameters["overrides"].get(k) == v for k, v in sets.items()))
    pairs = sorted((a, s) for a in ("none", "fixed_rel") for s in (0, 1, 2))
    single = [c for c in codec if c.parameters["overrides"].get("bins") == 4096 and c.arm in ("none", "fixed_rel")
              and c.parameters["overrides"]["steps"] == 3000 and "quantizer_warmup" not in c.parameters["overrides"]
              and "model" not in c.parameters["overrides"]]
    assert sorted((c.arm, c.seed) for c in single) == pairs
    # issue 37: the same codebook to 10,000 steps, the init cure, the designs without expiry; K = 16384 x 3 seeds
    assert group(10000) == pairs
    assert group(3000, quantizer_warmup=250, kmeans_frames=4800) == pairs
    # issue 38: the official 24 kHz architecture, unit-gain init, sub-band scores at every milestone
    official = [c for c in codec if c.parameters["overrides"].get("model") == "encodec_24khz"]
    assert sorted((c.arm, c.seed) for c in official) == [("fixed_rel", 0), ("none", 0)]
    assert all(c.parameters["overrides"]["init"] == "unit_gain" and c.parameters["evaluate"]["bands"] is True
               and c.parameters["overrides"]["milestones"] == [500, 1000, 2000] for c in official)
    assert sorted((c.arm, c.seed) for c in codec if c.arm in ("dac_commit16", "simvq")) == [("dac_commit16", 0),
                                                                                               ("simvq", 0)]
    assert sorted((c.arm, c.seed) for c in codec if c.parameters["overrides"].get("bins") == 16384) == pairs
    regimes_cell = plan.cells[-1]
    assert regimes_cell.notebook == "08_regimes" and set(regimes_cell.needs) == {c.name for c in codec}
    assert regimes_cell.parameters["source_run"] == source.name and regimes_cell.parameters["jobs"] == 2


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("init_from: source", "init_from: single4096_typo"),
     "scales.regimes.codec.groups.frozen.init_from: 'single4096_typo' is not an earlier group"),
    (lambda t: t.replace("compare_scales: [long]", "compare_scale: [long]"),
     "scales.regimes.regimes.compare_scale: unknown key"),
])
def test_regimes_scale_errors_name_the_group_or_the_key(tmp_path, edit, message):
    with pytest.raises(plans.StudyError, match=re.escape(message)):
        plans.plan_study("regimes", params=_params_copy(tmp_path, edit))


def test_only_a_notebook_on_a_fresh_results_folder_says_which_runs_the_aggregations_need(tmp_path, capsys):
    """Issue 36: `--only 01_bug_anatomy` (or one arm) on an empty results folder: the aggregations (04, 07, 08) are
    skipped with one line naming what to run first, instead of failing inside their notebooks."""
    plan = plans.plan_study("smoke", results=tmp_path, only=["01_bug_anatomy"])
    outcome = runner.Outcome()
    schedule = runner.Schedule.of(plan, outcome, jobs=1, gpus=None)
    assert [c.name for c in schedule.todo] == ["01_bug_anatomy", "04_compare", "07_long_horizon", "08_regimes"]
    outcome.statuses["01_bug_anatomy"] = "complete"
    reasons = {c.name: schedule.blocked(c) for c in schedule.todo[1:]}
    assert reasons["04_compare"].startswith("no codec run it reports on is complete yet: run them first (e.g. "
                                            "--only runs/")
    source = next(c for c in plan.cells if c.notebook == "08_regimes").requires[0]
    assert reasons["08_regimes"] == f"needs {source}, which is not selected: run it first (--only {source})"
