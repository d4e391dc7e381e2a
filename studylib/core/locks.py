"""One writer per folder: a `.lock` file holding the owner's PID, host and token.

Why: studies and training runs go on unattended for hours; a second `studylib study` or `studylib train` on
the same folder would run beside the first, both writing the same checkpoints and logs. `hold_lock` creates
the folder if needed and writes `<folder>/.lock` (JSON: pid, host, started, token); a second holder is refused
with one line naming that PID. The holder's token is in the environment of every process it starts
(`processes.marked`): a study's papermill, kernel and training. A lock is stale only when its process is gone
(killed with -9, machine rebooted) and no process carrying its token runs either (a kernel orphaned by a
killed study still writes the run folders): then it is taken over with a message. The lock is removed when the
holder exits, so it never outlives its run.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from studylib.core import processes
from studylib.core.config import UserError

LOCK_NAME = ".lock"


class LockedError(UserError):
    """The folder is locked by a live process; the message names its PID and host."""


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused PID from its owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22, counted after the parenthesised command name


def _alive(owner: dict) -> list[int]:
    """The live processes of the lock's owner: its own PID if it still runs, else those carrying its token
    (a lock from another host counts as alive: we cannot look at another machine's processes)."""
    if not owner:  # unreadable: a crash mid-write (the lock is written whole otherwise)
        return []
    pid = owner.get("pid")
    if owner.get("host") != socket.gethostname():
        return [pid]
    if isinstance(pid, int) and pid > 0 and _pid_alive(pid, owner.get("proc_start")):
        return [pid]
    token = owner.get("token")
    return processes.carrying(token) if isinstance(token, str) and token else []


def _pid_alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    return started is None or _proc_start(pid) in (None, started)


def _read(path: Path) -> dict | None:
    try:
        owner = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable or half-written by a process killed mid-write: treated as stale
    return owner if isinstance(owner, dict) else {}


def _create(path: Path, record: dict) -> bool:
    """Write the lock file whole, only if none exists (atomic: two takers never both win); its temporary file
    never stays behind, even when the disk is full."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(record))
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: exclusive create instead
            try:
                with open(path, "x") as handle:
                    handle.write(json.dumps(record))
                return True
            except FileExistsError:
                return False
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def token_of(path: Path) -> str | None:
    """The token of the lock file `path` (None without a readable one)."""
    token = (_read(path) or {}).get("token")
    return token if isinstance(token, str) and token else None


@contextlib.contextmanager
def hold_lock(folder: str | Path, what: str, mark: bool = True) -> Iterator[Path]:
    """Hold `<folder>/.lock` for the duration (creating `folder`); `what` names the command in messages.

    Raises LockedError (one line naming the PID) if a live process holds it, UserError if the folder cannot
    be written. A stale lock is taken over with one line on stderr. A lock held by an ancestor of this process
    (its token in this environment: the study runner holding a run folder while its notebook trains and evaluates
    there) is the caller's own: it goes on under it, and leaves it to its holder. `mark`: put the token in this
    process's environment for the duration (off where threads share it: the caller passes it to its children)."""
    folder = Path(folder)
    path = folder / LOCK_NAME
    token = uuid.uuid4().hex
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": datetime.now(UTC).isoformat(),
              "proc_start": _proc_start(os.getpid()), "command": what, "token": token}
    inherited = False
    try:
        folder.mkdir(parents=True, exist_ok=True)
        while True:
            # Read before writing anything: a refused second holder leaves the folder untouched.
            owner = _read(path)
            if owner is not None and owner.get("pid") != os.getpid() \
                    and owner.get("token") in os.environ.get(processes.ENV, "").split():
                inherited = True  # held for us by the process that started us (by this one: a second holder)
                break
            if owner is not None:
                if live := _alive(owner):
                    raise LockedError(_in_use(folder, path, owner, live))
                print(f"{what}: taking over the stale lock {path} of PID {owner.get('pid')} (no longer running)",
                      file=sys.stderr)
                path.unlink(missing_ok=True)
            if _create(path, record):
                break
    except OSError as e:
        raise UserError(f"{folder}: cannot write there ({e.strerror or e}); choose a writable folder") from None
    if inherited:
        yield path
        return
    try:
        with processes.marked(token) if mark else contextlib.nullcontext():
            yield path
    finally:
        if (_read(path) or {}).get("pid") == os.getpid():
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)


def _in_use(folder: Path, path: Path, owner: dict, live: list[int]) -> str:
    """Who holds a lock, in one line: its own process, or the processes it left running."""
    since = f"{owner.get('command')}, since {str(owner.get('started'))[:19]}"
    if live == [owner.get("pid")]:
        return (f"{folder} is in use by PID {owner.get('pid')} on {owner.get('host')} ({since}); wait for it to "
                f"finish, or delete {path} if that process is gone")
    return (f"{folder} is in use: PID {owner.get('pid')} ({since}) has exited, but {len(live)} process(es) it "
            f"started still run (PID {live[0]}: {processes.command_line(live[0])}); wait for them to finish or "
            f"stop them (kill {' '.join(map(str, live))})")
