"""Our processes and the ones they start: SIGTERM as an exception, and the mark every child inherits.

Why: `studylib study` runs papermill, papermill a Jupyter kernel in a session of its own, the kernel the
training (and torchrun its ranks). A signal to the study alone would leave them running, and the PID in a
lock file says nothing about them. So a lock holder puts a token into the environment (`STUDYLIB_OWNERS`,
see `marked`), which every process it starts inherits down the tree: `carrying(token)` finds them all, to
stop them (`stop`) or to tell whether a lock's study still runs after its own process died.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ENV = "STUDYLIB_OWNERS"  # space-separated tokens of the locks held by this process and its ancestors


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, `timeout`, a closed terminal), raised in the main thread like Ctrl-C's
    KeyboardInterrupt, so one path stops on both: runs are marked interrupted, locks released."""


_RAISING_PID: int | None = None  # the process whose SIGTERM raises Terminated (raise_on_sigterm)
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _terminated(signum: int, frame) -> None:
    if os.getpid() != _RAISING_PID:
        # A forked child that inherited the handler (a worker, before its initializer ran): raising here could
        # land in multiprocessing's exit finalizers and print a traceback. Die of the signal instead, quietly.
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise Terminated()


def raise_on_sigterm() -> None:
    """From now on SIGTERM raises Terminated in the main thread (a no-op elsewhere: only it gets signals)."""
    global _RAISING_PID
    if threading.current_thread() is threading.main_thread():
        _RAISING_PID = os.getpid()
        signal.signal(signal.SIGTERM, _terminated)


def _quiet_worker() -> None:
    """Every worker process starts here: Ctrl-C ignored (a terminal sends it to the whole process group; the
    parent stops its workers and prints the one line) and SIGTERM back to its default action, so a worker the
    parent terminates ends at once without running Python code (nothing can raise inside the interpreter's or
    multiprocessing's shutdown); then the signals held while it was forked (`worker_pool`) are let through."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM held back in this thread for the duration (delivered when it ends). A process forked
    meanwhile inherits the block, so no signal reaches a worker before `_quiet_worker` has set its handlers;
    threads started meanwhile (the pool's manager and queue feeder) keep it, so signals go to the main thread."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def worker_pool(jobs: int) -> ProcessPoolExecutor:
    """The process pool every studylib command uses for parallel work: forked workers set up by
    `_quiet_worker`. Submit the work inside `signals_held()` (the workers are forked at the first submit)."""
    return ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork"), initializer=_quiet_worker)


def stop_workers(grace_s: float = 10.0) -> None:
    """Terminate this process's worker processes and wait for them (a worker_pool's, after an error or a stop
    signal): each dies of SIGTERM at once (`_quiet_worker`), so nothing it was writing stays open."""
    for worker in multiprocessing.active_children():
        worker.terminate()
        worker.join(grace_s)


def stop_signal(error: BaseException) -> tuple[str, int]:
    """The signal behind a KeyboardInterrupt and the exit code that says so (128 + its number)."""
    return ("SIGTERM", 128 + signal.SIGTERM) if isinstance(error, Terminated) else ("SIGINT", 128 + signal.SIGINT)


@contextlib.contextmanager
def marked(token: str) -> Iterator[None]:
    """`token` in this process's environment for the duration, so every process started meanwhile (and
    everything those start) carries it."""
    before = os.environ.get(ENV)
    os.environ[ENV] = f"{before} {token}" if before else token
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = before


def carrying(token: str) -> list[int]:
    """PIDs of the live processes of this machine, other than this one, whose environment holds `token`
    (read from /proc; [] where there is none). A zombie's environment reads empty: it does not count."""
    found = []
    needle = f"{ENV}=".encode()
    for entry in Path("/proc").glob("[0-9]*"):
        pid = int(entry.name)
        if pid == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone meanwhile, or another user's
            continue
        for variable in environ.split(b"\0"):
            if variable.startswith(needle) and token.encode() in variable[len(needle):].split():
                found.append(pid)
                break
    return found


def command_line(pid: int) -> str:
    """A process's command line, shortened, for messages ("" if it is gone)."""
    try:
        return " ".join(Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0"))[:80].strip()
    except OSError:
        return ""


def _signal(pids: list[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signum)


def _wait(done, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def stop(token: str, leaders: list[subprocess.Popen], grace_s: float = 30.0) -> None:
    """Stop every process carrying `token`. First SIGINT to all but the `leaders` (papermill): a Jupyter kernel
    takes it as an interrupt, so the training in it marks its run interrupted and the cell ends with
    KeyboardInterrupt; the leaders then save their notebooks and exit on their own. Whatever still runs after
    `grace_s` gets SIGTERM, and SIGKILL 5 s later."""
    leader_pids = {proc.pid for proc in leaders}
    _signal([pid for pid in carrying(token) if pid not in leader_pids], signal.SIGINT)
    _wait(lambda: all(proc.poll() is not None for proc in leaders), grace_s)
    _signal([proc.pid for proc in leaders if proc.poll() is None] + carrying(token), signal.SIGTERM)
    if not _wait(lambda: all(proc.poll() is not None for proc in leaders) and not carrying(token), 5.0):
        _signal([proc.pid for proc in leaders if proc.poll() is None] + carrying(token), signal.SIGKILL)
        _wait(lambda: all(proc.poll() is not None for proc in leaders) and not carrying(token), 5.0)
