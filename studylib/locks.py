"""One writer per folder: a `.lock` file holding the owner's PID and host.

Why: studies and training runs go on unattended for hours; a second `studylib study` or `studylib train` on
the same folder would run beside the first, both writing the same checkpoints and logs. `hold_lock` creates
the folder if needed and writes `<folder>/.lock` (JSON: pid, host, started); a second holder is refused with
one line naming that PID. A lock whose process is gone (killed with -9, machine rebooted) is stale: it is
taken over with a message. The lock is removed when the holder exits, so it never outlives its run.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from studylib.config import UserError

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


def _alive(owner: dict) -> bool:
    """Whether the lock's owner still runs on this host (a lock from another host counts as alive)."""
    if not owner:  # unreadable: a crash mid-write (the lock is written whole otherwise)
        return False
    if owner.get("host") != socket.gethostname():
        return True  # we cannot look at another machine's processes: never take its lock over
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    started = owner.get("proc_start")
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
    """Write the lock file whole, only if none exists (atomic: two takers never both win)."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
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
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def hold_lock(folder: str | Path, what: str) -> Iterator[Path]:
    """Hold `<folder>/.lock` for the duration (creating `folder`); `what` names the command in messages.

    Raises LockedError (one line naming the PID) if a live process holds it, UserError if the folder cannot
    be written. A stale lock is taken over with one line on stderr."""
    folder = Path(folder)
    path = folder / LOCK_NAME
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": datetime.now(UTC).isoformat(),
              "proc_start": _proc_start(os.getpid()), "command": what}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        while True:
            # Read before writing anything: a refused second holder leaves the folder untouched.
            owner = _read(path)
            if owner is not None:
                if _alive(owner):
                    raise LockedError(
                        f"{folder} is in use by PID {owner.get('pid')} on {owner.get('host')} "
                        f"({owner.get('command')}, since {str(owner.get('started'))[:19]}); wait for it to finish, "
                        f"or delete {path} if that process is gone")
                print(f"{what}: taking over the stale lock {path} of PID {owner.get('pid')} (no longer running)",
                      file=sys.stderr)
                path.unlink(missing_ok=True)
            if _create(path, record):
                break
    except OSError as e:
        raise UserError(f"{folder}: cannot write there ({e.strerror or e}); choose a writable folder") from None
    try:
        yield path
    finally:
        if (_read(path) or {}).get("pid") == os.getpid():
            path.unlink(missing_ok=True)
