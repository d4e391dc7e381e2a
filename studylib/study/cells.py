"""A cell's record on disk (`cell.json`) and whether it is done: the one place that decides what a study re-runs.

A cell is complete when its record says so, with the same parameters and (for every notebook but the codec runs)
the same notebook, its report is there and (a codec run) its files check out. Both sides of each comparison are
made portable first (`portable`): paths under the results, params or repository folders are written relative to them,
so a clone in any folder, or a results folder moved elsewhere, finds its committed runs complete. What decides is
`why_stale`: the reason a cell would run, or None. The dry run prints it (`studylib study --dry-run`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from studylib.core import config as cfglib
from studylib.core.storage import DamagedFile, RefusedFile, read_json_object, read_parquet, read_torch, warn
from studylib.study.plan import CODEC_NOTEBOOK, ROOT, Cell, StudyPlan, codec_run_hash
from studylib.training.run_config import NOT_HASHED
from studylib.training.run_folder import RunFolder, stored_config

REPORT = "report.html"


def notebook_digest(path: Path) -> str:
    """Hash of a notebook's cell sources but its import lines: a report is stale when its notebook's code or text
    changed; moving a function from one studylib module to another does not change what the notebook computes."""
    cells = json.loads(path.read_text()).get("cells", [])
    text = "\x00".join("".join(line for line in _lines(c.get("source", ""))
                               if not line.lstrip().startswith(("import ", "from "))) for c in cells)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _lines(source: str | list[str]) -> list[str]:
    return source if isinstance(source, list) else source.splitlines(keepends=True)


def portable(value: Any, plan: StudyPlan) -> Any:
    """`value` (a cell's parameters) with every absolute path under the results folder written `{results}/...`,
    under the params folder `{params}/...` and under the repository `{repo}/...`: what names a cell, wherever the
    checkout, the params or the results sit."""
    roots = (("{results}", plan.results.parent), ("{params}", plan.params), ("{repo}", ROOT))
    if isinstance(value, dict):
        return {k: portable(v, plan) for k, v in value.items()}
    if isinstance(value, list):
        return [portable(v, plan) for v in value]
    if isinstance(value, str) and value.startswith(os.sep):
        for name, root in roots:
            if value == str(root) or value.startswith(str(root) + os.sep):
                return name + value[len(str(root)):]
    return value


def identity(parameters: dict, notebook: str) -> dict:
    """What of a cell's (portable) parameters names its work: a codec run's overrides without the keys that say
    how a run executes, not what it trains (NOT_HASHED: milestones, compile, progress...), as `studylib train`
    resumes across them."""
    if notebook != CODEC_NOTEBOOK or not isinstance(parameters.get("overrides"), dict):
        return parameters
    overrides = {k: v for k, v in parameters["overrides"].items() if k not in NOT_HASHED}
    return {**parameters, "overrides": overrides}


def read_record(path: Path, quiet: bool = False) -> dict | None:
    """A `cell.json` / `study.json`, or None if there is none; a damaged one, or one that is not a JSON object, is
    None with a warning (`quiet`: without; it is written again when its cell runs)."""
    try:
        return read_json_object(path)
    except DamagedFile as e:
        if not quiet:
            warn(f"{e}; taken as not done")
        return None


def why_stale(plan: StudyPlan, cell: Cell, problems: dict[str, str] | None = None) -> str | None:
    """Why `cell` would run (missing, failed earlier, parameters or notebook changed, damaged files), or None if
    it is complete. A codec run is named by its config: a changed 03 notebook does not make it stale (its report
    stays as it was rendered; training again would start from nothing where checkpoints stay out of git)."""
    folder = plan.folder(cell)
    record = read_record(folder / RunFolder.CELL)
    if record is None:
        return "damaged record (cell.json)" if (folder / RunFolder.CELL).is_file() else "missing"
    if record.get("status") != "complete":
        return f"{record.get('status', 'no status')} before"
    parameters = portable(cell.parameters, plan)
    if identity(record.get("parameters") or {}, cell.notebook) != identity(parameters, cell.notebook):
        return f"parameters changed ({_first_difference(record.get('parameters'), parameters)})"
    if cell.notebook != CODEC_NOTEBOOK and record.get("notebook_digest") != notebook_digest(plan.notebook_path(cell)):
        return "notebook source changed"
    if not (folder / REPORT).is_file():
        return f"no {REPORT}"
    if problems:
        name, why = next(iter(problems.items()))
        return f"damaged file ({why})" if name != RunFolder.CELL else f"damaged record ({why})"
    return None


def _first_difference(old: Any, new: Any, where: str = "") -> str:
    """The first key whose value differs between two parameter dicts, as 'key'."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                return _first_difference(old.get(key), new.get(key), f"{where}.{key}" if where else key)
    return where or "parameters"


def run_problems(folder: Path, config_hash: str | None = None) -> dict[str, str]:
    """What is wrong with a codec run's files, by file name, each as one line (empty: they check out):
    `cell.json` or `manifest.json` that do not read, a table of `RunFolder.TABLES` missing or unreadable, a
    `checkpoint.pt` that does not load or whose stored config does not hash to `config_hash` (the run's
    TrainConfig hash, when given), a `latents.pt` that does not load. A checkpoint may be absent: they stay out
    of git. RefusedFile if a checkpoint or latents file would run code: that is not damage to repair."""
    problems = {}
    records = {path.name for path in folder.glob("*.json")} | {RunFolder.CELL, RunFolder.MANIFEST}
    for name in sorted(records):  # every record a run keeps: evaluation settings, summary.json...
        try:
            read_json_object(folder / name)
        except DamagedFile as e:
            problems[name] = str(e)
    tables = {path.name for path in folder.glob("*.parquet")} | set(RunFolder.TABLES)
    for name in sorted(tables):  # every table: the run's, its evaluation's and its milestones'
        try:
            read_parquet(folder / name)
        except DamagedFile as e:
            problems[name] = str(e)
    checkpoints = [(path.name, "checkpoint") for path in sorted(folder.glob("checkpoint_step*.pt"))]
    for name, what in ((RunFolder.CHECKPOINT, "checkpoint"), (RunFolder.LATENTS, "latents file"), *checkpoints):
        if (folder / name).is_file():
            try:  # tensors stay on disk: the check reads the structure and the stored config
                found = read_torch(folder / name, what=what, mmap=True)
                if name == RunFolder.CHECKPOINT and config_hash is not None:
                    stored = cfglib.config_hash(stored_config(found, folder / name), exclude=NOT_HASHED)
                    if stored != config_hash:
                        problems[name] = f"{folder / name}: of another config ({stored}, the run's: {config_hash})"
            except RefusedFile:
                raise
            except cfglib.UserError as e:  # damaged, not a run checkpoint, or a config this studylib cannot read
                problems[name] = str(e)
    return problems


def codec_run_problems(plan: StudyPlan, repair: bool = True) -> dict[str, dict[str, str]]:
    """`run_problems` of every codec run folder of the plan, but latents.pt (02's cache, dumped again when
    missing): RefusedFile stops the study before anything runs. With `repair`, damaged files of the selected runs
    are moved aside (`<name>.damaged`, a warning naming each), so that the run resumes or trains again and its
    notebook evaluates again; the dry run only looks."""
    found = {}
    for cell in plan.cells:
        folder = plan.folder(cell)
        if cell.notebook != CODEC_NOTEBOOK or not folder.is_dir():
            continue
        problems = run_problems(folder, codec_run_hash(cell))
        for name, why in problems.items():
            # cell.json is rewritten when the cell runs; a missing table has nothing to move
            if repair and (cell.name in plan.selected or name == RunFolder.LATENTS) and name != RunFolder.CELL \
                    and (folder / name).is_file():
                os.replace(folder / name, folder / f"{name}.damaged")
                warn(f"{why}; moved aside to {name}.damaged, " + ("02 dumps it again" if name == RunFolder.LATENTS
                                                                    else "the run goes again"))
        found[cell.name] = {name: why for name, why in problems.items() if name != RunFolder.LATENTS}
    return found


def record(cell: Cell, plan: StudyPlan, **fields) -> dict:
    """A cell's `cell.json`: who it is, its parameters (portable), and `fields` (status, times, error...)."""
    return {"name": cell.name, "notebook": cell.notebook, "arm": cell.arm, "seed": cell.seed,
            "parameters": portable(cell.parameters, plan), **fields}
