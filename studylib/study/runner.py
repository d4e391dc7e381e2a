"""The study runner: expands params/study.yaml into notebook runs, executes them with papermill, renders
HTML reports and writes an index page.

    studylib study [--scale NAME] [--only NAME ...] [--jobs N] [--gpus 0,1,...] [--dry-run]

Every run ("cell") gets a folder under `results/<scale>/`: codec runs `runs/<arm>-<config hash>-s<seed>/`,
the other notebooks `<notebook>/`. A folder holds `parameters.yaml` (what papermill injected),
`report.ipynb` (the executed notebook, partial if it failed), `report.html` (rendered without code),
`papermill.log` and `cell.json` (status, times, error). A cell whose `cell.json` says complete with the
same parameters is skipped (`studylib.study.cells.why_stale`: a codec run only if its files check out; damaged files are
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
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import yaml

from studylib.analysis.findings import write_findings
from studylib.core import config as cfglib
from studylib.core import locks, processes
from studylib.core.storage import WriteError, atomic_write, check_writable, read_json, write_json
from studylib.study import cells as records
from studylib.study.corpus import PROFILES, build_corpus
from studylib.study.index import write_index
from studylib.study.plan import CODEC_NOTEBOOK, ROOT, Cell, StudyError, StudyPlan, plan_study
from studylib.training.manifest import CorpusError
from studylib.training.run_folder import RunFolder

FINAL = ("complete", "failed", "skipped", "not selected")


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


# ------------------------------------------------------------------------------------- one cell


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
    record = records.record(cell, plan, status="running", started=datetime.now(UTC).isoformat(),
                            notebook_digest=records.notebook_digest(plan.notebook_path(cell)), report=records.REPORT,
                            executed="report.ipynb", log="papermill.log")
    write_json(record, folder / RunFolder.CELL)
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
            render_html(out_nb, folder / records.REPORT)
        except Exception as e:  # a report that cannot render is a failed cell, not a crashed study
            error = error or f"rendering report.html failed: {type(e).__name__}: {e}"
    status = "interrupted" if children.stopping.is_set() else "failed" if error else "complete"
    record.update(status=status, error=error, finished=datetime.now(UTC).isoformat(),
                  seconds=round(time.perf_counter() - started, 1))
    write_json(record, folder / RunFolder.CELL)
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


# ------------------------------------------------------------------------------------- the study


def _ensure_manifest(plan: StudyPlan, data: Path) -> None:
    if plan.manifest.is_file():
        return

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


@dataclass
class Schedule:
    """Which cells can start, given what ran: the runner's deciding, apart from its starting and collecting."""

    plan: StudyPlan
    outcome: Outcome
    todo: list[Cell]
    workers: int
    free_gpus: list[int]
    n_gpus: int  # dispatching over --gpus: how many (0: not)

    @property
    def gpus(self) -> bool:
        return self.n_gpus > 0

    @classmethod
    def of(cls, plan: StudyPlan, outcome: Outcome, jobs: int, gpus: list[int] | None) -> Schedule:
        """Every cell's starting status (complete ones skipped, unless an aggregation), the pending ones to do."""
        problems = records.codec_run_problems(plan)
        for cell in plan.cells:
            complete = records.why_stale(plan, cell, problems.get(cell.name)) is None
            if cell.name not in plan.selected:
                outcome.statuses[cell.name] = "complete" if complete else "not selected"
            elif complete and not cell.always:
                outcome.statuses[cell.name] = "complete"
                print(f"  skip {cell.name}: complete")
            else:
                outcome.statuses[cell.name] = "pending"
        todo = [c for c in plan.cells if outcome.statuses[c.name] == "pending"]
        return cls(plan, outcome, todo, max(jobs, len(gpus or [])) if gpus else jobs, list(gpus or []), len(gpus or []))

    def blocked(self, cell: Cell) -> str | None:
        """Why `cell` will never start (the disk refused, a cell it needs failed or was skipped), or None."""
        if self.outcome.stopped:
            return f"not started: {self.outcome.stopped}"
        if cell.always:  # an aggregation: it reports on whatever its needs left on disk, once they are done
            return self._nothing_to_report(cell)
        for need in cell.needs:
            status = self.outcome.statuses[need]
            if status in ("failed", "skipped", "not selected"):
                return f"needs {need}, which is {status}"
        return None

    def _nothing_to_report(self, cell: Cell) -> str | None:
        """Why an aggregation whose needs are all done cannot run: a run it requires, or every codec run it
        reports on, is not complete (e.g. `--only NOTEBOOK` on a fresh results folder). None otherwise."""
        statuses = self.outcome.statuses
        if not all(statuses[n] in FINAL for n in cell.needs):
            return None
        for name in cell.requires:
            if statuses[name] != "complete":
                return f"needs {name}, which is {statuses[name]}: run it first (--only {name})"
        codec = [n for n in cell.needs if n.startswith("runs/")]
        if codec and not any(statuses[n] == "complete" for n in codec):
            return f"no codec run it reports on is complete yet: run them first (e.g. --only {codec[0]})"
        return None

    def ready(self, cell: Cell, running: int) -> list[int] | None:
        """The GPUs `cell` takes if it can start now (its needs done, a worker and its GPUs free), else None."""
        done = FINAL if cell.always else ("complete",)
        slots = min(cell.gpus, self.n_gpus) if self.gpus else 0
        if not all(self.outcome.statuses[n] in done for n in cell.needs) or running >= self.workers \
                or slots > len(self.free_gpus):
            return None
        return [self.free_gpus.pop(0) for _ in range(slots)]


def _run_cells(plan: StudyPlan, jobs: int, gpus: list[int] | None, verbose: bool, token: str) -> Outcome:
    """The scheduling loop: start what can start, wait for one to finish, collect it; on a signal, stop them all."""
    outcome, started = Outcome(), time.perf_counter()
    schedule = Schedule.of(plan, outcome, jobs, gpus)
    threads = max(1, (os.cpu_count() or 1) // schedule.workers)
    running: dict[futures.Future, tuple[Cell, list[int]]] = {}
    bar = _progress(len(schedule.todo), plan.scale)
    children = Children()
    with futures.ThreadPoolExecutor(max_workers=schedule.workers) as pool:
        try:
            while schedule.todo or running:
                _start_ready(schedule, running, pool, children, threads, verbose, bar)
                if not running:
                    for cell in schedule.todo:  # nothing can start and nothing runs: a dependency outside the plan
                        outcome.statuses[cell.name] = "skipped"
                    break
                done, _ = futures.wait(running, return_when=futures.FIRST_COMPLETED)
                for future in done:
                    _collect(schedule, *running.pop(future), future, bar)
        except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: stop the notebooks (and kernels) before going
            _stop(children, token, running, outcome, e)
            bar.close()
            _write_summary(plan, outcome, started, findings=False)
            raise
    bar.close()
    _write_summary(plan, outcome, started)
    return outcome


def _progress(total: int, scale: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"study {scale}", unit="run", dynamic_ncols=True, disable=None)


def _start_ready(schedule: Schedule, running: dict, pool: futures.Executor, children: Children, threads: int,
                 verbose: bool, bar) -> None:
    """Skip the cells that can never start; start those that can, each with its threads (and GPUs)."""
    plan, outcome = schedule.plan, schedule.outcome
    for cell in list(schedule.todo):
        if reason := schedule.blocked(cell):
            schedule.todo.remove(cell)
            outcome.statuses[cell.name], outcome.errors[cell.name] = "skipped", reason
            with _quiet_if(outcome.stopped):
                write_json(records.record(cell, plan, status="skipped", error=reason,
                                          finished=datetime.now(UTC).isoformat()), plan.folder(cell) / RunFolder.CELL)
            bar.update(1)
            bar.write(f"  skipped {cell.name}: {reason}")
            continue
        taken = schedule.ready(cell, len(running))
        if taken is None:
            continue
        env = os.environ | {"OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
        if schedule.gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, taken))
        schedule.todo.remove(cell)
        outcome.statuses[cell.name] = "running"
        bar.write(f"  start {cell.name} ({cell.notebook}); log: {plan.folder(cell) / 'papermill.log'}")
        running[pool.submit(execute_cell, plan, cell, env, verbose, children)] = (cell, taken)


def _collect(schedule: Schedule, cell: Cell, taken: list[int], future: futures.Future, bar) -> None:
    """A finished cell's status and error into the outcome; a full or read-only disk stops further starts."""
    outcome = schedule.outcome
    schedule.free_gpus.extend(taken)
    try:
        status, error = future.result()
    except Exception as e:  # the runner itself failed on this cell: record it, go on
        status, error = "failed", f"{type(e).__name__}: {e}"
    outcome.statuses[cell.name] = status
    outcome.finished += status == "complete"
    if error:
        outcome.errors[cell.name] = error
    if status == "failed" and not outcome.stopped:
        outcome.stopped = _disk_problem(schedule.plan, error)
    record = records.read_record(schedule.plan.folder(cell) / RunFolder.CELL) or {}
    bar.update(1)
    bar.write(f"  {status} {cell.name} in {record.get('seconds', 0):.0f} s" + (f": {error}" if error else ""))


def _stop(children: Children, token: str, running: dict, outcome: Outcome, error: KeyboardInterrupt) -> None:
    """Stop every running notebook, wait for them, mark them interrupted and say so on the KeyboardInterrupt."""
    children.stop(token)
    stopped = [cell.name for cell, _ in running.values()]
    futures.wait(running)
    for name in stopped:
        outcome.statuses[name] = "interrupted"
    error.add_note(f"{len(stopped)} running run(s) stopped and marked interrupted"
                   + (f" ({', '.join(stopped)})" if stopped else ""))


def _disk_problem(plan: StudyPlan, error: str | None) -> str | None:
    """Why the study cannot go on writing (a WriteError: full or read-only disk), or None."""
    if error and error.startswith("WriteError: "):
        return error.removeprefix("WriteError: ")
    try:
        check_writable(plan.results)
    except WriteError as e:
        return str(e)
    return None


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
               "manifest": records.portable(str(plan.manifest.resolve()), plan), "cells": [
                   {"name": c.name, "notebook": c.notebook, "arm": c.arm, "seed": c.seed,
                    "status": outcome.statuses[c.name], "error": outcome.errors.get(c.name)} for c in plan.cells]}
    try:
        write_json(summary, plan.results / "study.json")
        write_index(plan.results.parent)
        if findings:
            write_findings(plan.results.parent)  # results/summary.csv and the README's headline table
    except WriteError as e:
        outcome.stopped = outcome.stopped or str(e)


# ----------------------------------------------------------------------------------------- dry run


def dry_run(plan: StudyPlan) -> list[dict]:
    """What `run_study` would do, cell by cell, touching nothing: `action` (skip, run, not selected), `why` and
    `estimate_s` (from the scale's committed records: the cell's own last time, or for a codec run its steps at
    the median seconds a step of the scale's finished runs of the same model preset)."""
    problems = records.codec_run_problems(plan, repair=False)
    rates = _seconds_per_step(plan)
    rows = []
    for cell in plan.cells:
        why = records.why_stale(plan, cell, problems.get(cell.name))
        if cell.name not in plan.selected:
            action = "not selected"
        elif why is None and not cell.always:
            action = "skip"
        else:
            action, why = "run", why or "an aggregation over what is on disk: runs every time"
        estimate = _estimate(plan, cell, rates) if action == "run" else None
        rows.append({"cell": cell.name, "notebook": cell.notebook, "action": action, "why": why or "complete",
                     "estimate_s": estimate})
    return rows


def _setting(cell: Cell, key: str):
    """A codec run's training setting: its override, else the scale's overlay (the first of its params)."""
    value = cell.parameters["overrides"].get(key)
    return value if value is not None else cfglib.read_overlay(cell.parameters["params"][0]).get(key)


def _seconds_per_step(plan: StudyPlan) -> dict[str | None, float]:
    """Per model preset: the median seconds a training step of the scale's complete codec runs of that model took
    (records' wall times). A preset with no finished run has no rate: its runs get no estimate."""
    rates: dict[str | None, list[float]] = {}
    for cell in plan.cells:
        record = records.read_record(plan.folder(cell) / RunFolder.CELL, quiet=True) or {}
        if cell.notebook == CODEC_NOTEBOOK and record.get("status") == "complete" and record.get("seconds"):
            rates.setdefault(_setting(cell, "model"), []).append(record["seconds"] / _setting(cell, "steps"))
    return {model: statistics.median(found) for model, found in rates.items()}


def _estimate(plan: StudyPlan, cell: Cell, rates: dict[str | None, float]) -> float | None:
    if cell.notebook == CODEC_NOTEBOOK:
        rate = rates.get(_setting(cell, "model"))
        return None if rate is None else rate * _setting(cell, "steps")
    record = records.read_record(plan.folder(cell) / RunFolder.CELL, quiet=True) or {}
    return record.get("seconds")


def print_dry_run(plan: StudyPlan, rows: list[dict], jobs: int) -> None:
    """The dry run as a table, then the totals: cells to run and their estimated wall time at `jobs` at a time."""
    width = max(len(r["cell"]) for r in rows) if rows else 10
    for r in rows:
        estimate = "" if r["estimate_s"] is None else f"~{r['estimate_s'] / 60:.0f} min"
        print(f"  {r['action']:<12} {r['cell']:<{width}}  {estimate:>9}  {r['why']}")
    run = [r for r in rows if r["action"] == "run"]
    known = [r["estimate_s"] for r in run if r["estimate_s"] is not None]
    codec = sum(r["notebook"] == CODEC_NOTEBOOK for r in run)
    print(f"studylib study --dry-run: scale {plan.scale}: {len(run)} to run ({codec} codec runs to train), "
          f"{sum(r['action'] == 'skip' for r in rows)} complete; estimated {sum(known) / 60 / jobs:.0f} min at "
          f"--jobs {jobs}" + (f" ({len(run) - len(known)} without an estimate)" if len(known) < len(run) else "")
          + "; nothing was run")


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


def _scales(params: Path) -> list[str]:
    try:
        return sorted(cfglib.read_overlay(params / "study.yaml").get("scales") or {})
    except (cfglib.UserError, AttributeError):
        return []


def cli(argv: list[str]) -> int:
    params = ROOT / "params"
    scales = ", ".join(_scales(params)) or "see params/study.yaml"
    parser = argparse.ArgumentParser(prog="studylib study", description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="cpu", help=f"a scale of params/study.yaml: {scales} (default cpu)")
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="run only these arms, notebooks or runs (runs/<arm>-<hash>-s<seed>); "
                             "others' results are reused")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1; CPU threads are shared out)")
    parser.add_argument("--gpus", help="comma-separated GPU indices: one run per GPU")
    parser.add_argument("--results", default="results", help="results folder (default results)")
    parser.add_argument("--params", default=str(params), help="params folder (default the repo's)")
    parser.add_argument("--manifest", help="corpus manifest instead of the scale's corpus (e.g. your own audio)")
    parser.add_argument("--data", default="data", help="where corpora are built and cached (default data)")
    parser.add_argument("--verbose", action="store_true", help="stream the notebooks' output to the console")
    parser.add_argument("--dry-run", action="store_true",
                        help="list per run and notebook what would run and why, with estimated times, and exit")
    args = parser.parse_args(argv)
    try:
        if args.jobs < 1:
            raise StudyError(f"--jobs: got {args.jobs}, allowed an integer >= 1")
        gpus = None if args.dry_run else _parse_gpus(args.gpus)
        plan = plan_study(args.scale, args.results, args.params, args.only, args.manifest, args.data)
        if args.dry_run:
            print_dry_run(plan, dry_run(plan), args.jobs)
            return 0
    except ValueError as e:  # ConfigError and StudyError are ValueErrors
        print(f"studylib study: {e}", file=sys.stderr)
        return 2
    selected = [c for c in plan.cells if c.name in plan.selected]
    print(f"studylib study: scale {plan.scale}, {len(selected)} of {len(plan.cells)} runs selected, results in "
          f"{plan.results}")
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
    return _report(outcome, Path(args.results) / "index.html")


def _report(outcome: Outcome, index: Path) -> int:
    """The closing lines and the exit code: 1 if a cell failed, 2 if the disk stopped the study before any ran."""
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
