"""What the analyses read of a results folder: its codec runs as `RunRecord`s (`list_runs`, `read_run`) and their
tables.

The one way the runner, the findings and the notebooks find runs on disk. A run folder's file names are
`studylib.training.run_folder.RunFolder`'s.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from studylib.core.storage import DamagedFile, read_json, read_parquet, warn
from studylib.training.run_folder import RunFolder

if TYPE_CHECKING:
    import pandas as pd


RUN_NAME = re.compile(r"(?P<arm>.+)-(?P<config_hash>[0-9a-f]{10})-s(?P<seed>\d+)")  # runs/<arm>-<hash>-s<seed>



@dataclass(frozen=True)
class RunRecord:
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
    def files(self) -> RunFolder:
        """Its files by role (the names are RunFolder's)."""
        return RunFolder(self.folder)

    checkpoint = property(lambda self: self.files.checkpoint)
    metrics = property(lambda self: self.files.metrics)
    eval_items = property(lambda self: self.files.eval_items)
    eval_levels = property(lambda self: self.files.eval_levels)

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



def read_run(folder: str | Path) -> RunRecord:
    """The `RunRecord` of one codec run folder: arm and seed from the runner's `cell.json` and the training
    `manifest.json`, falling back to the folder name (`<arm>-<config hash>-s<seed>`). A record that does not
    read is left out, and named in `problem`."""
    folder, records, problem = Path(folder), {}, None
    for name in (RunFolder.MANIFEST, RunFolder.CELL):
        try:
            records[name] = read_json(folder / name) or {}
        except DamagedFile as e:
            records[name], problem = {}, problem or str(e)
    manifest, cell = records[RunFolder.MANIFEST], records[RunFolder.CELL]
    named = RUN_NAME.fullmatch(folder.name)
    seed = manifest.get("seed", cell.get("seed", int(named["seed"]) if named else None))
    return RunRecord(name=folder.name, arm=cell.get("arm") or (named["arm"] if named else folder.name),
               seed=seed, config_hash=named["config_hash"] if named else None,
               status=manifest.get("status", "not started"), folder=folder, manifest=manifest, problem=problem)



def list_runs(results_dir: str | Path, evaluated: bool = False) -> list[RunRecord]:
    """Every codec run of one scale's results folder (`results_dir/runs/*/` holding a manifest.json or a
    cell.json), sorted by folder name; with `evaluated`, only those scored on the test windows whose records
    and tables (`RunFolder.TABLES`) read: a damaged one is skipped with a warning naming it. The one way the runner,
    the findings and the notebooks find runs on disk."""
    folders = sorted(p for p in Path(results_dir).glob("runs/*")
                     if p.is_dir() and ((p / RunFolder.MANIFEST).is_file() or (p / RunFolder.CELL).is_file()))
    runs = [read_run(folder) for folder in folders]
    return [r for r in runs if r.evaluated and _readable(r)] if evaluated else runs



def _readable(run: RunRecord) -> bool:
    """Whether an evaluated run's records and tables read; a warning naming the first that does not."""
    problem = run.problem
    for name in RunFolder.TABLES:
        if problem:
            break
        try:
            read_parquet(run.folder / name)
        except DamagedFile as e:
            problem = str(e)
    if problem:
        warn(f"skipped the run {run.folder}: {problem}")
    return problem is None



def runs_table(runs: list[RunRecord]) -> pd.DataFrame:
    """`RunRecord.row()` of each run as a table (the listing the reports show)."""
    import pandas as pd

    return pd.DataFrame([r.row() for r in runs])



def run_tables(runs: list[RunRecord], file: str) -> pd.DataFrame:
    """The table `file` (e.g. eval_test.parquet) of every run, one frame, tagged with arm, seed and run."""
    import pandas as pd

    return pd.concat([read_parquet(r.folder / file).assign(arm=r.arm, seed=r.seed, run=r.name) for r in runs],
                     ignore_index=True)



def example_rows(runs: list[RunRecord], label: str, kinds: tuple[str, ...] = ("speech", "music")) -> list[dict]:
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
