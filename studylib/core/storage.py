"""Files on disk: the one atomic writer and the readers of JSON, parquet and torch files.

Every file studylib writes (manifests, metrics, checkpoints, evaluation tables, latents, reports) goes
through `atomic_write`, so a reader never sees half a file and a failed write (a full disk, a read-only
folder, a signal) leaves neither the file half-written nor its temporary behind: it is one `WriteError`
naming the folder and the cause. Every file studylib reads back goes through `read_json`, `read_parquet` or
`read_torch`, so a damaged one is one `DamagedFile` line naming it. `read_torch` unpickles only tensors and
plain containers (`weights_only=True`): a file that asks for anything else would run code, and is refused
(`RefusedFile`) without running it. Run checkpoints are read through `studylib.training.run_folder`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from studylib.core.config import UserError

if TYPE_CHECKING:  # torch is imported where it is used: reports and corpus use this module without it
    import pandas as pd
    import torch


class WriteError(UserError):
    """A file that could not be written (no space, read-only, no permission): one line naming its folder and
    the cause. Its temporary file is gone."""

    def __init__(self, path: Path, error: OSError, cause: str | None = None):
        self.path, self.no_space = Path(path), error.errno in (errno.ENOSPC, errno.EDQUOT)
        # pyarrow's OSErrors carry the errno but a long message of their own
        self.cause = cause or (os.strerror(error.errno) if error.errno else " ".join(str(error).split())[:120])
        advice = "free some space there or choose another folder" if self.no_space else "choose a writable folder"
        super().__init__(f"{self.path.parent}: cannot write {self.path.name} ({self.cause}); {advice}")


class DamagedFile(UserError):
    """A file studylib wrote that does not read back (truncated, edited, not ours): one line naming it."""


class RefusedFile(UserError):
    """A pickled file that asks for more than tensors and plain containers: loading it would run code."""


def warn(message: str) -> None:
    """One warning line on stderr (a damaged run skipped, a file moved aside, a corpus file left out), printed
    above any progress bar. The one warning helper of studylib."""
    from tqdm.auto import tqdm

    tqdm.write(f"warning: {message}", file=sys.stderr)
    sys.stderr.flush()


# ------------------------------------------------------------------------------------------ writing


def atomic_write(path: Path, write: Callable[[Path], Any]) -> Path:
    """`write(tmp)` then rename over `path`: readers never see a half-written file. On failure the temporary
    file is removed; an OSError (full disk, read-only folder) becomes a WriteError naming the folder."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except BaseException as error:  # a signal too: never leave the temporary file behind
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(error, Exception) and (cause := _os_error(error)):
            raise WriteError(path, cause) from None
        raise
    return path


def _os_error(error: BaseException | None) -> OSError | None:
    """The OSError behind a failed write: torch's zip writer, failing to close after one, raises a RuntimeError
    of its own ("unexpected pos") with the OSError as its context."""
    while error is not None and not isinstance(error, OSError):
        error = error.__cause__ or error.__context__
    return error


def check_writable(folder: str | Path, needs: int = 1 << 20) -> None:
    """WriteError unless a file can be written in `folder` (created if needed) and about `needs` bytes are free
    there: checked before long work, so a full disk or a read-only folder is said before the minutes of
    computing, not after them."""
    folder = Path(folder)
    probe = folder / f".write-check{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(bytes(4096))
        free = shutil.disk_usage(folder).free
    except OSError as error:
        raise WriteError(folder / "files", error) from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)
    if free < needs:
        raise WriteError(folder / "files", OSError(errno.ENOSPC, "no space"),
                         f"{free / 1e6:.1f} MB free, about {needs / 1e6:.1f} MB needed")


def write_parquet(frame: pd.DataFrame, path: str | Path) -> Path:
    """A table as parquet, written atomically."""
    return atomic_write(Path(path), lambda p: frame.to_parquet(p, index=False))


def save_torch(obj: Any, path: str | Path) -> Path:
    """`torch.save`, written atomically (through a file object, so that a full disk is an OSError naming its
    cause behind torch's "unexpected pos")."""
    import torch

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)

    return atomic_write(Path(path), save)


def write_json(obj: Any, path: str | Path) -> Path:
    """Pretty JSON, written atomically (NaN -> null)."""
    text = json.dumps(_jsonable(obj), indent=2, default=str)
    return atomic_write(Path(path), lambda p: p.write_text(text + "\n"))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if not math.isfinite(float(obj)) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


# ------------------------------------------------------------------------------------------ reading


def read_json(path: str | Path) -> Any:
    """The JSON in `path`, or None if there is no such file; DamagedFile naming it if it does not read."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DamagedFile(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DamagedFile(f"{path}: cannot be read ({one_line(e)})") from None


def read_json_object(path: str | Path, what: str = "record") -> dict | None:
    """`read_json` of a file that must hold a JSON object (a run's records): None if there is no such file,
    DamagedFile naming it if it does not read or holds anything else (a list, a number)."""
    found = read_json(path)
    if found is not None and not isinstance(found, dict):
        raise DamagedFile(f"{path}: holds a {type(found).__name__}, not a {what} (a JSON object)")
    return found


def read_parquet(path: str | Path) -> pd.DataFrame:
    """The table in a parquet file; DamagedFile naming it if it is missing or does not read (truncated...)."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise DamagedFile(f"{path}: no such table")
    try:
        return pd.read_parquet(path)
    except Exception as e:  # pyarrow's errors for a damaged file are ArrowInvalid, OSError...
        reason = one_line(type(e)(str(e).replace(f" '{path}'", "")))  # it names the file again
        raise DamagedFile(f"{path}: not a readable parquet table ({reason})") from None


def read_torch(path: str | Path, device: str | torch.device = "cpu", what: str = "torch file",
               mmap: bool = False) -> Any:
    """What `torch.load` finds in a file, unpickling only tensors and plain containers (weights_only=True):
    RefusedFile if the file asks for anything else (loading it would run code), DamagedFile otherwise.
    mmap: the tensors stay on disk until used (a cheap check of a large file)."""
    import pickle

    import torch

    path = Path(path)
    try:  # torch maps only its zip format; any other file is read whole (and checked the same way)
        return torch.load(path, map_location=device, weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except Exception as e:  # zero bytes, text, a truncated zip...: the unpickler's error depends on the bytes
        text = str(e)
        if isinstance(e, pickle.UnpicklingError) and (asked := re.search(r"GLOBAL (\S+)", text)):
            raise RefusedFile(f"{path}: refused: loading it would run code (it asks for {asked[1]}, not only "
                              f"tensors and plain containers); use only {what}s you trust") from None
        if isinstance(e, pickle.UnpicklingError) and (found := re.search(r"WeightsUnpickler error:\s*(.+)", text)):
            reason = f"UnpicklingError: {found[1].strip()[:120]}"
        else:
            reason = one_line(e)
        raise (UnreadableCheckpoint(path, reason) if what == "checkpoint" else
               DamagedFile(f"{path}: not a readable {what} ({reason})")) from None


# ---------------------------------------------------------------------------- unreadable checkpoints


class UnreadableCheckpoint(DamagedFile):
    """A checkpoint file torch cannot load; `reason` is the loader's error as one short line."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: not a readable checkpoint ({reason})")
        self.path, self.reason = path, reason


def one_line(error: Exception, limit: int = 120) -> str:
    """An exception as a short line: its type and first sentence."""
    text = " ".join(str(error).split()).split(". ")[0][:limit]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


