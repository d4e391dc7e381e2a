"""The study runner: expands params/study.yaml into notebook runs, executes them with papermill, renders
HTML reports and writes an index page.

    studylib study [--scale smoke|cpu|gpu] [--only NAME ...] [--jobs N] [--gpus 0,1,...]

Every run ("cell") gets a folder under `results/<scale>/`: codec runs `runs/<arm>-<config hash>-s<seed>/`,
the other notebooks `<notebook>/`. A folder holds `parameters.yaml` (what papermill injected),
`report.ipynb` (the executed notebook, partial if it failed), `report.html` (rendered without code),
`papermill.log` and `cell.json` (status, times, error). A cell whose `cell.json` says complete with the
same parameters is skipped (a codec run only if its files check out: see `run_problems`; damaged files are
moved aside as `<name>.damaged`, so it re-runs or resumes); an interrupted one runs again and resumes
(training from its checkpoint, the quantizer grid from its finished cells). A failing cell is recorded and
the others go on; cells that need it are skipped. The command exits 1 if any cell failed, 2 on bad params
or a run file that would run code (before anything runs) and when a full or read-only disk stopped it before
any run finished. SIGTERM or Ctrl-C stop the running notebooks (kernels and training included), mark those
cells `interrupted`, release the lock and exit 143 / 130.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import contextlib
import html
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from studylib import config as cfglib
from studylib import locks, processes
from studylib.storage import (
    DamagedFile,
    RefusedFile,
    WriteError,
    atomic_write,
    check_writable,
    read_json,
    read_parquet,
    read_torch,
    warn,
    write_json,
)

if TYPE_CHECKING:
    import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ("01_bug_anatomy", "02_quantizer_study", "03_train_codec", "04_compare", "05_codebook_audit",
             "06_cpu_recipe", "07_long_horizon", "08_regimes")
SCALE_KEYS = ("corpus", "train_params", "cell_timeout_s", "notebooks", "codec", "quantizer", "anatomy", "audit",
              "compare", "recipe", "horizon", "regimes")
CODEC_KEYS = ("arms", "seeds", "arm_seeds", "nproc_per_node", "evaluate", "set", "groups")
# a codec group: runs of their own settings within a scale (regimes: one codebook of 4096, a frozen encoder...);
# arms, seeds, evaluate and set default to the codec block's (set: overlaid on it)
GROUP_KEYS = ("arms", "seeds", "arm_seeds", "evaluate", "set", "init_from")
QUANTIZER_KEYS = ("latents_from", "base", "grid")
REGIMES_KEYS = ("latents_from", "base", "grid", "jobs", "train_cells", "compare_scales", "arm", "baseline",
                "milestones")  # 08_regimes
RECIPE_KEYS = ("arm", "steps", "valid_every", "seed", "variants")
VARIANT_KEYS = ("change", "set")
OPUS_BITRATES = [0.5, 6.0, 12.0, 24.0]  # kbps asked of opusenc (0.5: the lowest it accepts, its floor)
FINAL = ("complete", "failed", "skipped", "not selected")
OFFICIAL_ENCODEC = Path.home() / ".cache" / "torch" / "hub" / "checkpoints" / "encodec_24khz-d7cc33bc.th"


class StudyError(cfglib.ConfigError):
    """Bad study parameters; one line naming the key and what is allowed."""


@dataclass
class Cell:
    """One notebook execution."""

    name: str  # its folder relative to the scale's results folder, e.g. runs/fixed_rel-1a2b3c4d5e-s0
    notebook: str
    parameters: dict[str, Any]
    needs: tuple[str, ...] = ()
    arm: str | None = None
    seed: int | None = None
    gpus: int = 0  # GPUs it takes when the runner dispatches over --gpus
    always: bool = False  # re-run even when complete (aggregations over what is on disk)


@dataclass
class StudyPlan:
    scale: str
    results: Path  # results/<scale>
    manifest: Path
    corpus: str | None  # profile to build when the manifest is missing
    timeout_s: int
    cells: list[Cell]
    selected: set[str]  # names of the cells this invocation runs
    notebooks: Path = ROOT / "notebooks"  # where <cell.notebook>.ipynb is read from

    def folder(self, cell: Cell) -> Path:
        return self.results / cell.name

    def notebook_path(self, cell: Cell) -> Path:
        return self.notebooks / f"{cell.notebook}.ipynb"


@dataclass
class Outcome:
    """What `run_study` did: per cell its final status (and error), and the wall time."""

    statuses: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    finished: int = 0  # cells that ran to `complete` in this invocation
    stopped: str | None = None  # why no further cell was started (a WriteError: full or read-only disk)

    @property
    def failed(self) -> list[str]:
        return [name for name, status in self.statuses.items() if status == "failed"]


# ------------------------------------------------------------------------------------------- plan


def _check_keys(where: str, mapping: Any, allowed: tuple[str, ...]) -> dict:
    if not isinstance(mapping, dict):
        raise StudyError(f"{where}: expected a mapping, got {mapping!r}")
    for key in mapping:
        if key not in allowed:
            raise StudyError(f"{where}.{key}: unknown key; allowed keys: {', '.join(allowed)}")
    return mapping


def load_study(path: str | Path, scale: str) -> dict:
    """The settings of one scale from params/study.yaml, keys checked."""
    data = cfglib.read_overlay(path)
    scales = _check_keys(str(path), data, ("scales",)).get("scales") or {}
    if scale not in scales:
        raise StudyError(f"--scale: got {scale!r}, allowed {sorted(scales)} (from {path})")
    settings = _check_keys(f"scales.{scale}", scales[scale], SCALE_KEYS)
    for name in settings.get("notebooks", NOTEBOOKS):
        if name not in NOTEBOOKS:
            raise StudyError(f"scales.{scale}.notebooks: {name!r} unknown; allowed {NOTEBOOKS}")
    _check_keys(f"scales.{scale}.codec", settings.get("codec", {}), CODEC_KEYS)
    _check_keys(f"scales.{scale}.quantizer", settings.get("quantizer", {}), QUANTIZER_KEYS)
    _check_keys(f"scales.{scale}.regimes", settings.get("regimes", {}), REGIMES_KEYS)
    return settings


RUNNER_KEYS = ("manifest", "results_dir", "out_dir", "progress")  # parameters every cell gets from the runner
# The blocks of a scale handed to one notebook, and how their keys reach it: a block's keys are that notebook's
# parameters, less the runner's and those it derives (`derived`), plus the block's own (`extra`, translated).
NOTEBOOK_BLOCKS = {"anatomy": ("01_bug_anatomy", (), ()),
                   "audit": ("05_codebook_audit", ("runs",), ("arms",)),
                   "compare": ("04_compare", (), ()),
                   "horizon": ("07_long_horizon", (), ())}


def notebook_parameters(path: Path) -> tuple[str, ...]:
    """The names of a notebook's `parameters` cell, as papermill reads them (what it can inject)."""
    import logging

    import papermill

    logging.getLogger("papermill").setLevel(logging.ERROR)  # its parser's warnings are not the user's error
    return tuple(papermill.inspect_notebook(str(path)))


def check_notebook_blocks(scale: str, settings: dict, notebooks: Path = ROOT / "notebooks") -> None:
    """Every key of the notebook blocks of a scale (anatomy, audit, compare) names a parameter of its
    notebook (StudyError naming the block, the key and the allowed keys otherwise)."""
    for block, (notebook, derived, extra) in NOTEBOOK_BLOCKS.items():
        if block in settings:
            names = notebook_parameters(notebooks / f"{notebook}.ipynb")
            allowed = tuple(extra) + tuple(n for n in names if n not in RUNNER_KEYS + tuple(derived))
            _check_keys(f"scales.{scale}.{block}", settings[block] or {}, allowed)


def _check_cells_against_notebooks(cells: list[Cell], notebooks: Path) -> None:
    """Every parameter the runner hands a notebook, but the common ones (`RUNNER_KEYS`, which a notebook may
    leave out), is one of its parameters: the runner and the notebooks agree."""
    known: dict[str, tuple[str, ...]] = {}
    for cell in cells:
        if cell.notebook not in known:
            known[cell.notebook] = notebook_parameters(notebooks / f"{cell.notebook}.ipynb")
        unknown = sorted(set(cell.parameters) - set(known[cell.notebook]) - set(RUNNER_KEYS))
        if unknown:
            raise StudyError(f"{cell.name}: {cell.notebook} has no parameter {unknown[0]!r}; its parameters: "
                             f"{', '.join(known[cell.notebook])}")


def _codec_config(scale_file: Path, arm_file: Path, sets: dict):
    from studylib.train import TrainConfig

    return cfglib.build(TrainConfig, [cfglib.read_overlay(scale_file), cfglib.read_overlay(arm_file), sets])


def _codec_groups(scale: str, codec: dict) -> list[dict]:
    """The codec block as its groups, each with every key resolved: one unnamed group without `groups`."""
    where = f"scales.{scale}.codec"
    raw = codec.get("groups")
    if raw is None:
        raw = {"": {}}
    elif not isinstance(raw, dict) or not raw:
        raise StudyError(f"{where}.groups: got {raw!r}, allowed a mapping of group names to their settings")
    groups = []
    for name, group in raw.items():
        group = _check_keys(f"{where}.groups.{name}", group or {}, GROUP_KEYS) if name else {}
        resolved = {"name": name, "arms": group.get("arms", codec.get("arms", [])),
                    "seeds": group.get("seeds", codec.get("seeds", [0])),
                    "arm_seeds": group.get("arm_seeds", codec.get("arm_seeds") or {}),
                    "evaluate": dict(group.get("evaluate", codec.get("evaluate")) or {}),
                    "set": {**(codec.get("set") or {}), **(group.get("set") or {})},
                    "init_from": group.get("init_from")}
        here = f"{where}.groups.{name}" if name else where
        if not isinstance(resolved["arm_seeds"], dict) or not set(resolved["arm_seeds"]) <= set(resolved["arms"]):
            raise StudyError(f"{here}.arm_seeds: got {resolved['arm_seeds']!r}, allowed a mapping of the codec "
                             f"arms {resolved['arms']} to lists of seeds")
        for key, values in [("seeds", resolved["seeds"])] + [(f"arm_seeds.{a}", v)
                                                              for a, v in resolved["arm_seeds"].items()]:
            if not isinstance(values, list) or not values or \
                    not all(isinstance(s, int) and not isinstance(s, bool) for s in values):
                raise StudyError(f"{here}.{key}: got {values!r}, allowed a non-empty list of integers")
        groups.append(resolved)
    return groups


def plan_study(scale: str, results: str | Path = "results", params: str | Path = ROOT / "params",
               only: list[str] | None = None, manifest: str | Path | None = None,
               data: str | Path = "data") -> StudyPlan:
    """Expand the grid of `scale` into cells and validate every one of them (StudyError otherwise)."""
    from studylib.codec import EMA_QUANTIZERS
    from studylib.latents import expand_grid
    from studylib.train import NOT_HASHED

    params = Path(params)
    settings = load_study(params / "study.yaml", scale)
    check_notebook_blocks(scale, settings)
    # the TrainConfig overlay of the codec runs: params/scales/<train_params>.yaml, by default the scale's own
    scale_file = params / "scales" / f"{settings.get('train_params', scale)}.yaml"
    if not scale_file.is_file():
        where = f"scales.{scale}.train_params" if "train_params" in settings else "--scale"
        raise StudyError(f"{where}: {scale_file} does not exist")
    corpus = settings.get("corpus")
    given = manifest is not None
    manifest = Path(manifest) if given else Path(data) / str(corpus) / "manifest.csv"
    if given or manifest.is_file():
        # a given manifest must exist (a mistyped path must not start a corpus build), and any must be whole
        from studylib.corpus import load_manifest

        load_manifest(manifest, check_files=True)
    results = Path(results).resolve() / scale
    notebooks = settings.get("notebooks", list(NOTEBOOKS))
    codec = settings.get("codec", {})
    groups = _codec_groups(scale, codec)
    arms, seeds = groups[0]["arms"], groups[0]["seeds"]
    nproc = codec.get("nproc_per_node", 1)
    if not isinstance(nproc, int) or nproc < 1:
        raise StudyError(f"scales.{scale}.codec.nproc_per_node: got {nproc!r}, allowed an integer >= 1")
    cells: list[Cell] = []
    codec_runs: dict[tuple[str, int], Cell] = {}  # the first group's runs, by (arm, seed)
    group_runs: dict[str, list[Cell]] = {}  # every group's runs, in order

    if "01_bug_anatomy" in notebooks:
        cells.append(Cell("01_bug_anatomy", "01_bug_anatomy", dict(settings.get("anatomy") or {})))
    if "03_train_codec" in notebooks:
        for group in groups:
            where = f"scales.{scale}.codec" + (f".groups.{group['name']}" if group["name"] else "")
            source = None
            if group.get("init_from"):  # the fine-tuning regime: start from (and wait for) an earlier group's run
                if not group_runs.get(group["init_from"]):
                    raise StudyError(f"{where}.init_from: {group['init_from']!r} is not an earlier group; allowed "
                                     f"{sorted(group_runs)}")
                source = group_runs[group["init_from"]][0]
            group_runs[group["name"]] = []
            for arm in group["arms"]:
                if not (params / "arms" / f"{arm}.yaml").is_file():
                    known = sorted(p.stem for p in (params / "arms").glob("*.yaml"))
                    raise StudyError(f"{where}.arms: {arm!r} unknown; allowed {known}")
            # seed by seed (every arm's seed 0 first): a study stopped part-way leaves arms paired by seed
            arm_seeds = group["arm_seeds"]
            pairs = sorted(((arm, seed) for arm in group["arms"] for seed in arm_seeds.get(arm, group["seeds"])),
                           key=lambda pair: (pair[1], group["arms"].index(pair[0])))
            for arm, seed in pairs:
                arm_file = params / "arms" / f"{arm}.yaml"
                sets = {**group["set"], "seed": seed, "manifest": str(manifest.resolve()), "progress": False}
                if source is not None:
                    sets["init_from"] = str((results / source.name).resolve())
                try:
                    cfg = _codec_config(scale_file, arm_file, sets)
                except cfglib.ConfigError as e:
                    raise StudyError(f"{where} ({arm}, seed {seed}): {e}") from None
                # the source's place on disk is not what the run is: a moved checkout keeps its names
                chash = cfglib.config_hash(cfg, exclude=(*NOT_HASHED, "manifest", "seed", "init_from"))
                cell = Cell(f"runs/{arm}-{chash}-s{seed}", "03_train_codec", {
                    "params": [str(scale_file.resolve()), str(arm_file.resolve())],
                    "overrides": sets, "nproc_per_node": nproc, "evaluate": group["evaluate"],
                }, needs=(source.name,) if source else (), arm=arm, seed=seed, gpus=nproc)
                if group is groups[0]:
                    codec_runs[(arm, seed)] = cell
                group_runs[group["name"]].append(cell)
                cells.append(cell)

    def codec_run(key: str, arm: str) -> Cell:
        if (arm, seeds[0]) not in codec_runs:
            raise StudyError(f"scales.{scale}.{key}: {arm!r} is not among the codec arms {arms}")
        return codec_runs[(arm, seeds[0])]

    compare = {"evaluate": dict(codec.get("evaluate") or {}), "opus_bitrates": OPUS_BITRATES,
               **(settings.get("compare") or {})}
    if "06_cpu_recipe" in notebooks:
        recipe = _recipe_cell(scale, settings.get("recipe") or {}, scale_file, params, codec_runs, compare)
        # right after the runs it needs: with --jobs > 1 its variants train beside the other arms' runs
        after = max((i for i, c in enumerate(cells) if c.name in recipe.needs), default=len(cells) - 1)
        cells.insert(after + 1, recipe)
    if "02_quantizer_study" in notebooks:
        q = settings.get("quantizer") or {}
        source = codec_run("quantizer.latents_from", q.get("latents_from", "fixed_rel"))
        base, grid = dict(q.get("base") or {}), list(q.get("grid") or [])
        if not grid:
            raise StudyError(f"scales.{scale}.quantizer.grid: empty; give at least one block with an 'arm'")
        try:
            expand_grid(grid, params / "arms", base)  # validates every quantizer cell now
        except cfglib.ConfigError as e:
            raise StudyError(f"scales.{scale}.quantizer: {e}") from None
        cells.append(Cell("02_quantizer_study", "02_quantizer_study", {
            "source_run": source.name, "base": base, "grid": grid, "arms_dir": str((params / "arms").resolve()),
        }, needs=(source.name,)))
    if "05_codebook_audit" in notebooks:
        audit = dict(settings.get("audit") or {})
        audited = [codec_run("audit.arms", arm) for arm in audit.pop("arms", arms[:1])]
        for cell in audited:  # the audit reads EMA statistics: dac and simvq keep none
            quantizer = cfglib.read_overlay(params / "arms" / f"{cell.arm}.yaml").get("quantizer", "ours")
            if quantizer not in EMA_QUANTIZERS:
                raise StudyError(f"scales.{scale}.audit.arms: {cell.arm!r} (quantizer {quantizer!r}) keeps no EMA "
                                 f"statistics to audit; allowed arms of the quantizers {EMA_QUANTIZERS}")
        cells.append(Cell("05_codebook_audit", "05_codebook_audit", {
            "runs": [c.name for c in audited], "official": str(OFFICIAL_ENCODEC), **audit,
        }, needs=tuple(c.name for c in audited)))
    if "04_compare" in notebooks:
        cells.append(Cell("04_compare", "04_compare", compare,
                          needs=tuple(c.name for c in cells), always=True))
    if "07_long_horizon" in notebooks:  # on whatever codec runs finished, like 04
        horizon = {"evaluate": compare["evaluate"], "opus_bitrates": compare["opus_bitrates"],
                   **(settings.get("horizon") or {})}
        codec_cells = tuple(c.name for c in cells if c.notebook == "03_train_codec")
        cells.append(Cell("07_long_horizon", "07_long_horizon", horizon, needs=codec_cells, always=True))

    if "08_regimes" in notebooks:  # the quantizer-only map on a codec run's latents, then every regime's tables
        r = dict(settings.get("regimes") or {})
        source = codec_run("regimes.latents_from", r.pop("latents_from", arms[0] if arms else "none"))
        if not r.get("grid"):
            raise StudyError(f"scales.{scale}.regimes.grid: empty; give at least one block with an 'arm'")
        try:
            expand_grid(r["grid"], params / "arms", r.get("base") or {})  # validates every quantizer cell now
        except cfglib.ConfigError as e:
            raise StudyError(f"scales.{scale}.regimes: {e}") from None
        codec_cells = tuple(c.name for c in cells if c.notebook == "03_train_codec")
        cells.append(Cell("08_regimes", "08_regimes", {
            **r, "source_run": source.name, "arms_dir": str((params / "arms").resolve()),
        }, needs=codec_cells, always=True))

    common = {"manifest": str(manifest.resolve()), "results_dir": str(results.resolve()), "progress": False}
    for cell in cells:
        cell.parameters = {**cell.parameters, **common, "out_dir": str((results / cell.name).resolve())}
    _check_cells_against_notebooks(cells, ROOT / "notebooks")

    selected = {c.name for c in cells}
    if only:
        known = {c.arm for c in cells if c.arm} | {c.notebook for c in cells} | {c.name for c in cells}
        for name in only:
            if name not in known:
                raise StudyError(f"--only: {name!r} matches no run; allowed arms and notebooks {sorted(known)}")
        selected = {c.name for c in cells if {c.arm, c.notebook, c.name} & set(only) or c.always}
    timeout = settings.get("cell_timeout_s", 3600)
    if not isinstance(timeout, int) or timeout < 1:
        raise StudyError(f"scales.{scale}.cell_timeout_s: got {timeout!r}, allowed an integer >= 1 (seconds)")
    return StudyPlan(scale, results, manifest, corpus, timeout, cells, selected)


def _recipe_cell(scale: str, recipe: dict, scale_file: Path, params: Path, codec_runs: dict[tuple[str, int], Cell],
                 compare: dict) -> Cell:
    """The recipe study (06): its variants validated as TrainConfigs now; it shows the grid's runs of its
    arm (the chosen recipe, every seed) beside them, so it needs those."""
    where = f"scales.{scale}.recipe"
    _check_keys(where, recipe, RECIPE_KEYS)
    arm = recipe.get("arm", "none")
    arm_file = params / "arms" / f"{arm}.yaml"
    if not arm_file.is_file():
        known = sorted(p.stem for p in arm_file.parent.glob("*.yaml"))
        raise StudyError(f"{where}.arm: {arm!r} unknown; allowed {known}")
    variants = recipe.get("variants") or {}
    if not isinstance(variants, dict) or not variants:
        raise StudyError(f"{where}.variants: got {variants!r}, allowed a mapping name -> {{change, set}}")
    steps, valid_every, seed = recipe.get("steps", 400), recipe.get("valid_every", 50), recipe.get("seed", 0)
    for name, value in (("steps", steps), ("valid_every", valid_every), ("seed", seed)):
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "seed" else 1):
            raise StudyError(f"{where}.{name}: got {value!r}, allowed an integer >= {0 if name == 'seed' else 1}")
    for name, variant in variants.items():
        _check_keys(f"{where}.variants.{name}", variant, VARIANT_KEYS)
        try:
            _codec_config(scale_file, arm_file, {**(variant.get("set") or {}), "steps": steps,
                                                  "valid_every": valid_every, "seed": seed})
        except cfglib.ConfigError as e:
            raise StudyError(f"{where}.variants.{name}.set: {e}") from None
    chosen = [cell for (run_arm, _), cell in codec_runs.items() if run_arm == arm]
    return Cell("06_cpu_recipe", "06_cpu_recipe", {
        "params": [str(scale_file.resolve()), str(arm_file.resolve())],
        "variants": {name: {"change": str(v.get("change", name)), "set": dict(v.get("set") or {})}
                     for name, v in variants.items()},
        "steps": steps, "valid_every": valid_every, "seed": seed, "chosen_runs": [c.name for c in chosen],
        "evaluate": compare["evaluate"], "opus_bitrates": compare["opus_bitrates"],
    }, needs=tuple(c.name for c in chosen))


# -------------------------------------------------------------------------------------------- run


def notebook_digest(path: Path) -> str:
    """Hash of a notebook's cell sources: a report is stale when its notebook's code or text changed."""
    import hashlib

    cells = json.loads(path.read_text()).get("cells", [])
    text = "\x00".join("".join(c.get("source", "")) for c in cells)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _read_record(path: Path) -> dict | None:
    """A `cell.json` / `study.json`, or None if there is none; a damaged one is None with a warning (it is
    written again when its cell runs)."""
    try:
        return read_json(path)
    except DamagedFile as e:
        warn(f"{e}; taken as not done")
        return None


def _is_complete(plan: StudyPlan, cell: Cell, problems: dict[str, str] | None = None) -> bool:
    """Done before, with the same parameters and the same notebook, its report is there and (a codec run)
    its files check out (`problems`: what `run_problems` found wrong with them)."""
    folder = plan.folder(cell)
    record = _read_record(folder / "cell.json")
    return bool(record and record.get("status") == "complete" and record.get("parameters") == cell.parameters
                and record.get("notebook_digest") == notebook_digest(plan.notebook_path(cell))
                and (folder / "report.html").is_file() and not problems)


RUN_TABLES = ("metrics.parquet", "eval_test.parquet", "eval_test_levels.parquet")  # every evaluated codec run's


def run_problems(folder: Path, config_hash: str | None = None) -> dict[str, str]:
    """What is wrong with a codec run's files, by file name, each as one line (empty: they check out):
    `cell.json` or `manifest.json` that do not read, a table of `RUN_TABLES` missing or unreadable, a
    `checkpoint.pt` that does not load or whose stored config does not hash to `config_hash` (the run's
    TrainConfig hash, when given), a `latents.pt` that does not load. A checkpoint may be absent: they stay out
    of git. RefusedFile if a checkpoint or latents file would run code: that is not damage to repair."""
    from studylib.storage import stored_config

    problems = {}
    for name in ("cell.json", "manifest.json"):
        try:
            read_json(folder / name)
        except DamagedFile as e:
            problems[name] = str(e)
    for name in RUN_TABLES:
        try:
            read_parquet(folder / name)
        except DamagedFile as e:
            problems[name] = str(e)
    for name, what in (("checkpoint.pt", "checkpoint"), ("latents.pt", "latents file")):
        if (folder / name).is_file():
            try:  # tensors stay on disk: the check reads the structure and the stored config
                found = read_torch(folder / name, what=what, mmap=True)
                if name == "checkpoint.pt" and config_hash is not None:
                    stored = cfglib.config_hash(stored_config(found, folder / name), exclude=("run_dir", "progress"))
                    if stored != config_hash:
                        problems[name] = f"{folder / name}: of another config ({stored}, the run's: {config_hash})"
            except RefusedFile:
                raise
            except cfglib.UserError as e:  # damaged, not a run checkpoint, or a config this studylib cannot read
                problems[name] = str(e)
    return problems


def _codec_run_hash(cell: Cell) -> str:
    """The TrainConfig hash `train` gives a codec cell's run (what its checkpoint must store)."""
    params = cell.parameters["params"]
    cfg = _codec_config(Path(params[0]), Path(params[1]), cell.parameters["overrides"])
    return cfglib.config_hash(cfg, exclude=("run_dir", "progress"))


def _check_codec_runs(plan: StudyPlan) -> dict[str, dict[str, str]]:
    """`run_problems` of every codec run folder of the plan, but latents.pt (02's cache, dumped again when
    missing): RefusedFile stops the study before anything runs. Damaged files of the selected runs are moved
    aside (`<name>.damaged`, a warning naming each), so that the run resumes or trains again and its notebook
    evaluates again."""
    found = {}
    for cell in plan.cells:
        folder = plan.folder(cell)
        if cell.notebook != "03_train_codec" or not folder.is_dir():
            continue
        problems = run_problems(folder, _codec_run_hash(cell))
        for name, why in problems.items():
            # cell.json is rewritten when the cell runs; a missing table has nothing to move
            if (cell.name in plan.selected or name == "latents.pt") and name != "cell.json" \
                    and (folder / name).is_file():
                os.replace(folder / name, folder / f"{name}.damaged")
                warn(f"{why}; moved aside to {name}.damaged, " + ("02 dumps it again" if name == "latents.pt"
                                                                    else "the run goes again"))
        found[cell.name] = {name: why for name, why in problems.items() if name != "latents.pt"}
    return found


def _first_error(notebook: Path) -> str | None:
    """'ename: evalue' of the first error output in an executed notebook."""
    try:
        nb = json.loads(notebook.read_text())
    except (OSError, ValueError):
        return None
    for cell in nb.get("cells", []):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                return f"{output.get('ename')}: {output.get('evalue')}"[:500]
    return None


def render_html(notebook: Path, out: Path) -> Path:
    """The executed notebook as HTML without code cells (nbconvert --no-input)."""
    import nbformat
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True)
    body, _ = exporter.from_notebook_node(nbformat.read(str(notebook), as_version=4))
    return atomic_write(out, lambda p: p.write_text(body, encoding="utf-8"))


class Children:
    """The papermill processes a study runs, so that a signal stops them and all they run before it exits."""

    def __init__(self) -> None:
        self.procs: set[subprocess.Popen] = set()
        self.lock = threading.Lock()
        self.stopping = threading.Event()

    def run(self, cmd: list[str], **kwargs) -> int | None:
        """Run `cmd` in a session of its own (Ctrl-C in the terminal reaches the runner only) and wait for it;
        None if the study is stopping (then it does not start)."""
        with self.lock:
            if self.stopping.is_set():
                return None
            proc = subprocess.Popen(cmd, start_new_session=True, **kwargs)
            self.procs.add(proc)
        try:
            return proc.wait()
        finally:
            with self.lock:
                self.procs.discard(proc)

    def stop(self, token: str) -> None:
        """Stop every running notebook and what it runs (`processes.stop`: kernels first, so a training run
        marks itself interrupted); further signals wait until that is done."""
        handlers = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            with self.lock:
                self.stopping.set()
                running = list(self.procs)
            processes.stop(token, running)
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)


def execute_cell(plan: StudyPlan, cell: Cell, env: dict[str, str] | None = None,
                 verbose: bool = False, children: Children | None = None) -> tuple[str, str | None]:
    """Run one cell's notebook with papermill in a subprocess and render it; returns (status, error).

    papermill writes to a temporary name: a whole notebook (complete, or partial when it failed or was
    interrupted) is then moved to report.ipynb, one cut short (a full disk) removed."""
    children = children or Children()
    folder = plan.folder(cell)
    record = _record(cell, status="running", started=datetime.now(UTC).isoformat(),
                     notebook_digest=notebook_digest(plan.notebook_path(cell)), report="report.html",
                     executed="report.ipynb", log="papermill.log")
    write_json(record, folder / "cell.json")
    atomic_write(folder / "parameters.yaml", lambda p: p.write_text(yaml.safe_dump(cell.parameters, sort_keys=False)))
    out_nb, partial = folder / "report.ipynb", folder / ".report.tmp.ipynb"
    out_nb.unlink(missing_ok=True)  # an earlier run's report must not pass for this one's
    cmd = [sys.executable, "-m", "papermill", str(plan.notebook_path(cell)), str(partial),
           "-f", str(folder / "parameters.yaml"), "-k", "python3", "--cwd", str(folder),
           "--execution-timeout", str(plan.timeout_s), "--no-progress-bar", "--log-output"]
    started = time.perf_counter()
    try:
        with open(folder / "papermill.log", "w") as log:
            code = children.run(cmd, stdout=None if verbose else log,
                                stderr=subprocess.STDOUT if not verbose else None, env=env, cwd=folder)
    finally:
        _keep_notebook(partial, out_nb)
    error = None
    if children.stopping.is_set():
        error = "interrupted: the study was stopped; run it again to resume"
    elif code != 0:
        error = _first_error(out_nb) or _log_tail(folder / "papermill.log")
    if out_nb.is_file():
        try:
            render_html(out_nb, folder / "report.html")
        except Exception as e:  # a report that cannot render is a failed cell, not a crashed study
            error = error or f"rendering report.html failed: {type(e).__name__}: {e}"
    status = "interrupted" if children.stopping.is_set() else "failed" if error else "complete"
    record.update(status=status, error=error, finished=datetime.now(UTC).isoformat(),
                  seconds=round(time.perf_counter() - started, 1))
    write_json(record, folder / "cell.json")
    return status, error


def _keep_notebook(partial: Path, out: Path) -> None:
    """papermill's output under its real name if it is a whole notebook; removed if it was cut short."""
    try:
        json.loads(partial.read_text())
        os.replace(partial, out)
    except (OSError, ValueError):
        partial.unlink(missing_ok=True)


def _log_tail(path: Path, lines: int = 6) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "papermill failed before writing a log"
    return " | ".join(text[-lines:])[-500:] or "papermill exited with an error"


def _ensure_manifest(plan: StudyPlan, data: Path) -> None:
    if plan.manifest.is_file():
        return
    from studylib.corpus import PROFILES, build_corpus

    if plan.corpus not in PROFILES:
        raise StudyError(f"manifest {plan.manifest} does not exist; build it with `studylib corpus` or pass --manifest")
    print(f"studylib study: building the {plan.corpus!r} corpus into {data} (cached for later runs)")
    build_corpus(plan.corpus, data)


def run_study(plan: StudyPlan, jobs: int = 1, gpus: list[int] | None = None, data: str | Path = "data",
              verbose: bool = False) -> Outcome:
    """Execute the selected cells of `plan` in dependency order, `jobs` at a time (or one per GPU), holding
    the results folder's lock (UserError naming the PID if another study holds it). On Ctrl-C or SIGTERM the
    running cells are stopped and marked interrupted before the KeyboardInterrupt goes on (a note on it
    names them)."""
    _ensure_manifest(plan, Path(data))
    with locks.hold_lock(plan.results, "studylib study") as lock:
        return _run_cells(plan, jobs, gpus, verbose, read_json(lock)["token"])


def _disk_problem(plan: StudyPlan, error: str | None) -> str | None:
    """Why the study cannot go on writing (a WriteError: full or read-only disk), or None."""
    if error and error.startswith("WriteError: "):
        return error.removeprefix("WriteError: ")
    try:
        check_writable(plan.results)
    except WriteError as e:
        return str(e)
    return None


def _run_cells(plan: StudyPlan, jobs: int, gpus: list[int] | None, verbose: bool, token: str) -> Outcome:
    from tqdm.auto import tqdm

    outcome, started = Outcome(), time.perf_counter()
    problems = _check_codec_runs(plan)
    for cell in plan.cells:
        complete = _is_complete(plan, cell, problems.get(cell.name))
        if cell.name not in plan.selected:
            outcome.statuses[cell.name] = "complete" if complete else "not selected"
        elif complete and not cell.always:
            outcome.statuses[cell.name] = "complete"
            print(f"  skip {cell.name}: complete")
        else:
            outcome.statuses[cell.name] = "pending"
    free_gpus = list(gpus or [])
    workers = max(jobs, len(free_gpus)) if gpus else jobs
    threads = max(1, (os.cpu_count() or 1) // workers)
    running: dict[futures.Future, tuple[Cell, list[int]]] = {}
    todo = [c for c in plan.cells if outcome.statuses[c.name] == "pending"]
    bar = tqdm(total=len(todo), desc=f"study {plan.scale}", unit="run", dynamic_ncols=True, disable=None)
    children = Children()

    def blocked(cell: Cell) -> str | None:
        if outcome.stopped:
            return f"not started: {outcome.stopped}"
        if cell.always:  # an aggregation: it reports on whatever its needs left on disk
            return None
        for need in cell.needs:
            status = outcome.statuses[need]
            if status in ("failed", "skipped", "not selected"):
                return f"needs {need}, which is {status}"
        return None

    with futures.ThreadPoolExecutor(max_workers=workers) as pool:
        try:
            while todo or running:
                for cell in list(todo):
                    reason = blocked(cell)
                    if reason:
                        todo.remove(cell)
                        outcome.statuses[cell.name], outcome.errors[cell.name] = "skipped", reason
                        with _quiet_if(outcome.stopped):
                            _record_skip(plan, cell, reason)
                        bar.update(1)
                        tqdm.write(f"  skipped {cell.name}: {reason}")
                        continue
                    ready = all(outcome.statuses[n] in (FINAL if cell.always else ("complete",)) for n in cell.needs)
                    slots = min(cell.gpus, len(gpus)) if gpus else 0
                    if not ready or len(running) >= workers or slots > len(free_gpus):
                        continue
                    taken = [free_gpus.pop(0) for _ in range(slots)]
                    env = os.environ | {"OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
                    if gpus:
                        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, taken))
                    todo.remove(cell)
                    outcome.statuses[cell.name] = "running"
                    tqdm.write(f"  start {cell.name} ({cell.notebook}); log: {plan.folder(cell) / 'papermill.log'}")
                    running[pool.submit(execute_cell, plan, cell, env, verbose, children)] = (cell, taken)
                if not running:
                    if todo:  # nothing can start and nothing runs: a dependency outside the plan
                        for cell in todo:
                            outcome.statuses[cell.name] = "skipped"
                        todo.clear()
                    break
                done, _ = futures.wait(running, return_when=futures.FIRST_COMPLETED)
                for future in done:
                    cell, taken = running.pop(future)
                    free_gpus.extend(taken)
                    try:
                        status, error = future.result()
                    except Exception as e:  # the runner itself failed on this cell: record it, go on
                        status, error = "failed", f"{type(e).__name__}: {e}"
                    outcome.statuses[cell.name] = status
                    outcome.finished += status == "complete"
                    if error:
                        outcome.errors[cell.name] = error
                    if status == "failed" and not outcome.stopped:
                        outcome.stopped = _disk_problem(plan, error)
                    record = _read_record(plan.folder(cell) / "cell.json") or {}
                    bar.update(1)
                    seconds = record.get("seconds", 0)
                    tqdm.write(f"  {status} {cell.name} in {seconds:.0f} s" + (f": {error}" if error else ""))
        except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: stop the notebooks (and kernels) before going
            children.stop(token)
            stopped = [cell.name for cell, _ in running.values()]
            futures.wait(running)
            for name in stopped:
                outcome.statuses[name] = "interrupted"
            e.add_note(f"{len(stopped)} running run(s) stopped and marked interrupted"
                       + (f" ({', '.join(stopped)})" if stopped else ""))
            bar.close()
            _write_summary(plan, outcome, started, findings=False)
            raise
    bar.close()
    _write_summary(plan, outcome, started)
    return outcome


@contextlib.contextmanager
def _quiet_if(stopped: str | None):
    """Where the disk already refused: records that cannot be written are not a second error."""
    try:
        yield
    except WriteError:
        if not stopped:
            raise


def _write_summary(plan: StudyPlan, outcome: Outcome, started: float, findings: bool = True) -> None:
    """study.json, results/index.html and (findings) summary.csv and the READMEs' headline table; on a disk
    that refuses, the study says so once (`outcome.stopped`) instead of failing again."""
    outcome.seconds = time.perf_counter() - started
    summary = {"scale": plan.scale, "finished": datetime.now(UTC).isoformat(), "seconds": round(outcome.seconds, 1),
               "manifest": str(plan.manifest), "cells": [
                   {"name": c.name, "notebook": c.notebook, "arm": c.arm, "seed": c.seed,
                    "status": outcome.statuses[c.name], "error": outcome.errors.get(c.name)} for c in plan.cells]}
    try:
        write_json(summary, plan.results / "study.json")
        write_index(plan.results.parent)
        if findings:
            from studylib.findings import write_findings

            write_findings(plan.results.parent)  # results/summary.csv and the README's headline table
    except WriteError as e:
        outcome.stopped = outcome.stopped or str(e)


def _record(cell: Cell, **fields) -> dict:
    """A cell's `cell.json`: who it is, its parameters, and `fields` (status, times, error...)."""
    return {"name": cell.name, "notebook": cell.notebook, "arm": cell.arm, "seed": cell.seed,
            "parameters": cell.parameters, **fields}


def _record_skip(plan: StudyPlan, cell: Cell, reason: str) -> None:
    write_json(_record(cell, status="skipped", error=reason, finished=datetime.now(UTC).isoformat()),
               plan.folder(cell) / "cell.json")


# ------------------------------------------------------------------------------------------ index


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;width:100%;margin:1em 0}th,td{border-bottom:1px solid #ddd;padding:.35em .6em;
text-align:left;font-size:.92em}th{background:#f5f5f5}.complete{color:#1a7f37}.failed{color:#cf222e;font-weight:bold}
.skipped,.running,.pending,.interrupted{color:#9a6700}code{background:#f5f5f5;padding:0 .2em}
.err{color:#cf222e;font-size:.85em}"""


def write_index(results: str | Path) -> Path:
    """results/index.html: every scale's runs (status, time, report, error) and the study's headline files."""
    results = Path(results)
    sections = []
    for study_file in sorted(results.glob("*/study.json")):
        scale_dir = study_file.parent
        study = _read_record(study_file)
        if not study:
            continue
        rows = []
        for entry in study["cells"]:
            folder = scale_dir / entry["name"]
            record = _read_record(folder / "cell.json") or {}
            status = record.get("status", entry["status"])
            # the report only: executed notebooks stay out of git, so a committed index must not link them
            links = [f'<a href="{scale_dir.name}/{entry["name"]}/report.html">report</a>'] \
                if (folder / "report.html").is_file() else []
            error = record.get("error") or entry.get("error")
            seconds = record.get("seconds")
            rows.append(
                f'<tr><td><code>{html.escape(entry["name"])}</code></td><td>{entry["notebook"]}</td>'
                f'<td>{entry.get("arm") or ""}</td><td>{"" if entry.get("seed") is None else entry["seed"]}</td>'
                f'<td class="{status}">{status}</td><td>{"" if seconds is None else f"{seconds / 60:.1f} min"}</td>'
                f'<td>{" · ".join(links)}' + (f'<div class="err">{html.escape(error)}</div>' if error else "")
                + "</td></tr>")
        files = [p for pattern in ("04_compare/*.png", "04_compare/*.csv") for p in sorted(scale_dir.glob(pattern))]
        file_links = " · ".join(f'<a href="{p.relative_to(results).as_posix()}">{p.name}</a>' for p in files)
        sections.append(
            f'<h2 id="{scale_dir.name}">Scale <code>{scale_dir.name}</code></h2>'
            f'<p>{len(study["cells"])} runs, finished {study["finished"][:16].replace("T", " ")} UTC, '
            f'{study["seconds"] / 60:.1f} min for this invocation. '
            f'Corpus: <code>{html.escape(study["manifest"])}</code>.'
            + (f' Start with the <a href="{scale_dir.name}/04_compare/report.html">comparison report</a>.'
               if (scale_dir / "04_compare" / "report.html").is_file() else "") + "</p>"
            "<table><tr><th>run</th><th>notebook</th><th>arm</th><th>seed</th><th>status</th><th>time</th>"
            f'<th>links</th></tr>{"".join(rows)}</table>'
            + (f"<p>Tables and figures: {file_links}</p>" if file_links else ""))
    body = "".join(sections) or "<p>No study has run yet: <code>make study</code>.</p>"
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>EnCodec dead-code expiry study</title>"
            f"<style>{_CSS}</style></head><body><h1>Does dead-code expiry work in EnCodec?</h1>"
            "<p>Reports of <code>studylib study</code> (facebookresearch/encodec issue "
            "<a href='https://github.com/facebookresearch/encodec/issues/61'>#61</a>). Each report is a "
            "papermill-executed notebook rendered without its code; tables and figures are beside it.</p>"
            f"{body}</body></html>")
    return atomic_write(results / "index.html", lambda p: p.write_text(page, encoding="utf-8"))


# ------------------------------------------------------------------------------- notebook helpers


def train_run(params: list[str], overrides: dict, run_dir: str | Path, nproc_per_node: int = 1):
    """Train (or resume) a codec run from a notebook: in this process, or under torchrun with
    `nproc_per_node` processes (DDP: gloo on CPU, nccl on GPU). Returns the run's metrics table."""
    from studylib.train import TrainConfig, read_manifest, train

    sets = {**overrides, "run_dir": str(run_dir)}
    if nproc_per_node == 1:
        run = train(cfglib.build(TrainConfig, [*(cfglib.read_overlay(p) for p in params), sets]))
        if run.status != "complete":
            raise RuntimeError(f"training failed: {(read_manifest(run_dir) or {}).get('error')}")
        return run.metrics
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc_per_node),
           "-m", "studylib.train", *params]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={json.dumps(value)}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return read_parquet(Path(run_dir) / "metrics.parquet")


RUN_NAME = re.compile(r"(?P<arm>.+)-(?P<config_hash>[0-9a-f]{10})-s(?P<seed>\d+)")  # runs/<arm>-<hash>-s<seed>


@dataclass(frozen=True)
class Run:
    """One codec run folder of a results folder (`runs/<arm>-<config hash>-s<seed>/`), as `list_runs` finds it."""

    name: str  # the folder's name, e.g. fixed_rel-1a2b3c4d5e-s0
    arm: str
    seed: int | None
    config_hash: str | None  # the study's hash in the folder name (the plan's identity of the run)
    status: str  # training: manifest.json's status ("complete", "failed", ...), "not started" without one
    folder: Path
    manifest: dict = field(default_factory=dict, compare=False, repr=False)  # manifest.json, {} without one
    problem: str | None = field(default=None, compare=False)  # its cell.json or manifest.json does not read

    @property
    def checkpoint(self) -> Path:
        return self.folder / "checkpoint.pt"

    @property
    def metrics(self) -> Path:
        return self.folder / "metrics.parquet"

    @property
    def eval_items(self) -> Path:
        return self.folder / "eval_test.parquet"

    @property
    def eval_levels(self) -> Path:
        return self.folder / "eval_test_levels.parquet"

    @property
    def milestone_evals(self) -> dict[int, tuple[Path, Path]]:
        """step -> (items, levels) tables of each evaluated milestone checkpoint (eval_test_step<N>*.parquet)."""
        found = {}
        for levels in self.folder.glob("eval_test_step*_levels.parquet"):
            step = levels.name.removeprefix("eval_test_step").removesuffix("_levels.parquet")
            items = levels.with_name(f"eval_test_step{step}.parquet")
            if step.isdigit() and items.is_file():
                found[int(step)] = (items, levels)
        return found

    @property
    def evaluated(self) -> bool:
        """Scored on the test windows: both evaluation tables are on disk."""
        return self.eval_items.is_file() and self.eval_levels.is_file()

    def row(self) -> dict:
        """A flat row for listings: name, arm, seed, hash, status, steps, device, training minutes, paths."""
        config = self.manifest.get("config") or {}
        return {"run": self.name, "arm": self.arm, "seed": self.seed, "config_hash": self.config_hash,
                "status": self.status, "steps": config.get("steps"), "device": self.manifest.get("device"),
                "train_min": round(self.manifest.get("train_seconds", float("nan")) / 60, 1),
                "evaluated": self.evaluated, "folder": str(self.folder), "checkpoint": str(self.checkpoint)}


def read_run(folder: str | Path) -> Run:
    """The `Run` of one codec run folder: arm and seed from the runner's `cell.json` and the training
    `manifest.json`, falling back to the folder name (`<arm>-<config hash>-s<seed>`). A record that does not
    read is left out, and named in `problem`."""
    folder, records, problem = Path(folder), {}, None
    for name in ("manifest.json", "cell.json"):
        try:
            records[name] = read_json(folder / name) or {}
        except DamagedFile as e:
            records[name], problem = {}, problem or str(e)
    manifest, cell = records["manifest.json"], records["cell.json"]
    named = RUN_NAME.fullmatch(folder.name)
    seed = manifest.get("seed", cell.get("seed", int(named["seed"]) if named else None))
    return Run(name=folder.name, arm=cell.get("arm") or (named["arm"] if named else folder.name),
               seed=seed, config_hash=named["config_hash"] if named else None,
               status=manifest.get("status", "not started"), folder=folder, manifest=manifest, problem=problem)


def list_runs(results_dir: str | Path, evaluated: bool = False) -> list[Run]:
    """Every codec run of one scale's results folder (`results_dir/runs/*/` holding a manifest.json or a
    cell.json), sorted by folder name; with `evaluated`, only those scored on the test windows whose records
    and tables (`RUN_TABLES`) read: a damaged one is skipped with a warning naming it. The one way the runner,
    the findings and the notebooks find runs on disk."""
    folders = sorted(p for p in Path(results_dir).glob("runs/*")
                     if p.is_dir() and ((p / "manifest.json").is_file() or (p / "cell.json").is_file()))
    runs = [read_run(folder) for folder in folders]
    return [r for r in runs if r.evaluated and _readable(r)] if evaluated else runs


def _readable(run: Run) -> bool:
    """Whether an evaluated run's records and tables read; a warning naming the first that does not."""
    problem = run.problem
    for name in RUN_TABLES:
        if problem:
            break
        try:
            read_parquet(run.folder / name)
        except DamagedFile as e:
            problem = str(e)
    if problem:
        warn(f"skipped the run {run.folder}: {problem}")
    return problem is None


def runs_table(runs: list[Run]) -> pd.DataFrame:
    """`Run.row()` of each run as a table (the listing the reports show)."""
    import pandas as pd

    return pd.DataFrame([r.row() for r in runs])


def run_tables(runs: list[Run], file: str) -> pd.DataFrame:
    """The table `file` (e.g. eval_test.parquet) of every run, one frame, tagged with arm, seed and run."""
    import pandas as pd

    return pd.concat([read_parquet(r.folder / file).assign(arm=r.arm, seed=r.seed, run=r.name) for r in runs],
                     ignore_index=True)


def example_rows(runs: list[Run], label: str, kinds: tuple[str, ...] = ("speech", "music")) -> list[dict]:
    """For listening: per kind, the first example of the first run (examples/<stem>_reference.flac) and each
    run's `<stem>_<label>.flac` of the same seed (None where missing), keyed by arm."""
    rows = []
    for kind in kinds:
        refs = sorted((runs[0].folder / "examples").glob(f"{kind}_*_reference.flac")) if runs else []
        if not refs:
            continue
        stem = refs[0].name[: -len("_reference.flac")]
        row = {"example": stem, "reference": refs[0]}
        for r in runs:
            if r.seed == runs[0].seed:
                path = r.folder / "examples" / f"{stem}_{label}.flac"
                row[r.arm] = path if path.is_file() else None
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------- CLI


def _parse_gpus(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        gpus = [int(g) for g in text.split(",") if g.strip()]
    except ValueError:
        raise StudyError(f"--gpus: got {text!r}, allowed a comma-separated list of GPU indices such as 0,1") from None
    if not gpus or len(set(gpus)) != len(gpus) or min(gpus) < 0:
        raise StudyError(f"--gpus: got {text!r}, allowed distinct GPU indices >= 0 such as 0,1")
    import torch

    count = torch.cuda.device_count()  # the devices CUDA_VISIBLE_DEVICES leaves visible
    if not count:
        raise StudyError(f"--gpus: got {text!r}, but torch sees no CUDA device on this machine; leave --gpus out to "
                         "run on the CPU")
    if max(gpus) >= count:
        raise StudyError(f"--gpus: got {text!r}, but torch sees {count} CUDA device(s): allowed indices 0 to "
                         f"{count - 1}")
    return gpus


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="studylib study", description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="cpu",
                        help="a scale of params/study.yaml: smoke, cpu, long or gpu (default cpu)")
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="run only these arms, notebooks or runs (runs/<arm>-<hash>-s<seed>); "
                             "others' results are reused")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1; CPU threads are shared out)")
    parser.add_argument("--gpus", help="comma-separated GPU indices: one run per GPU")
    parser.add_argument("--results", default="results", help="results folder (default results)")
    parser.add_argument("--params", default=str(ROOT / "params"), help="params folder (default the repo's)")
    parser.add_argument("--manifest", help="corpus manifest instead of the scale's corpus (e.g. your own audio)")
    parser.add_argument("--data", default="data", help="where corpora are built and cached (default data)")
    parser.add_argument("--verbose", action="store_true", help="stream the notebooks' output to the console")
    args = parser.parse_args(argv)
    try:
        if args.jobs < 1:
            raise StudyError(f"--jobs: got {args.jobs}, allowed an integer >= 1")
        gpus = _parse_gpus(args.gpus)
        plan = plan_study(args.scale, args.results, args.params, args.only, args.manifest, args.data)
    except ValueError as e:  # ConfigError and StudyError are ValueErrors
        print(f"studylib study: {e}", file=sys.stderr)
        return 2
    selected = [c for c in plan.cells if c.name in plan.selected]
    print(f"studylib study: scale {plan.scale}, {len(selected)} of {len(plan.cells)} runs selected, results in "
          f"{plan.results}")
    from studylib.corpus import CorpusError

    try:
        outcome = run_study(plan, args.jobs, gpus, args.data, args.verbose)
    except (cfglib.UserError, CorpusError) as e:  # a locked or read-only results folder, a corpus not built, a
        print(f"studylib study: {e}", file=sys.stderr)  # run file that would run code: before anything ran
        return 2
    except KeyboardInterrupt as e:  # the running notebooks are stopped and marked interrupted, the lock released
        signal_name, code = processes.stop_signal(e)
        stopped = e.__notes__[-1] if getattr(e, "__notes__", None) else "nothing was running"
        print(f"studylib study: stopped by {signal_name}: {stopped}; run the same command again to resume",
              file=sys.stderr)
        return code
    index = Path(args.results) / "index.html"
    print(f"studylib study: {len(outcome.failed)} failed, {outcome.seconds / 60:.1f} min; open {index}")
    if outcome.stopped:  # a full or read-only disk: the one reason, not the same error for every run
        print(f"studylib study: {outcome.stopped} (stopped starting runs: {len(outcome.failed)} failed, "
              f"{sum(e.startswith('not started') for e in outcome.errors.values())} not started, {outcome.finished} "
              f"finished; run the same command again once it is fixed)", file=sys.stderr)
        return 1 if outcome.finished else 2
    for name in outcome.failed:
        print(f"  FAILED {name}: {outcome.errors.get(name)}", file=sys.stderr)
    return 1 if outcome.failed else 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
