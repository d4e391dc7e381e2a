"""A corpus manifest: its columns and splits, its reader and the check that its audio files are there and decode.

`studylib corpus` (studylib.study.corpus) writes manifests; training, evaluation and the analyses read them
through `load_manifest`, so a bad one is one `ManifestError` line naming it before a run writes anything.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf

from studylib.core.config import UserError
from studylib.core.storage import warn

SPLITS = ("train", "valid", "test")
KINDS = ("speech", "music")
COLUMNS = ["path", "split", "kind", "group", "source", "license", "seconds"]


def decode_failure(error: Exception) -> str:
    """Why an audio file could not be read, as one line (libsndfile's message names the file again: dropped)."""
    return re.sub(r"^Error opening '.*?': ", "", " ".join(str(error).split())) or type(error).__name__


SPLITS = ("train", "valid", "test")



KINDS = ("speech", "music")



COLUMNS = ["path", "split", "kind", "group", "source", "license", "seconds"]



class CorpusError(RuntimeError):
    """A build that cannot produce a usable corpus; the CLI prints it as one line and exits 2."""



class ManifestError(UserError):
    """A manifest that is missing, unreadable or lists files that are not there; one line naming it."""



def load_manifest(path: str | Path, check_files: bool = False) -> pd.DataFrame:
    """Read a manifest, keeping group names such as "NA" or "01" as strings.

    Every check of a manifest lives here, so a bad one is one line naming it (ManifestError) before a run
    writes anything: the path is a file, a CSV with our columns and splits, and (check_files) every audio
    file it lists exists beside it."""
    path = Path(path)
    if path.is_dir():
        raise ManifestError(f"{path}: is a folder; give the manifest.csv file that `studylib corpus` wrote in it")
    if not path.is_file():
        raise ManifestError(f"{path}: no such manifest; build one with `studylib corpus --profile ci` (or "
                            "--audio-dir DIR) or give the path of an existing manifest.csv")
    dtypes = {column: str for column in COLUMNS} | {"seconds": float}
    try:
        frame = pd.read_csv(path, dtype=dtypes, keep_default_na=False)
    except (OSError, ValueError) as error:  # pandas' parser, dtype and decoding errors are ValueErrors
        reason = " ".join(str(error).split())[:160] or type(error).__name__
        raise ManifestError(f"{path}: not a readable manifest CSV ({reason}); expected the columns "
                            f"{','.join(COLUMNS)}") from None
    if list(frame.columns) != COLUMNS:
        raise ManifestError(f"{path}: columns {list(frame.columns)}, expected {COLUMNS}")
    if unknown := sorted(set(frame["split"]) - set(SPLITS)):
        raise ManifestError(f"{path}: split {unknown[0]!r} unknown; allowed {', '.join(SPLITS)}")
    bad = frame[~(np.isfinite(frame["seconds"]) & (frame["seconds"] > 0))]
    if len(bad):
        raise ManifestError(f"{path}: {bad.path.iloc[0]} has seconds {float(bad.seconds.iloc[0])!r}, allowed a "
                            f"number > 0 ({len(bad)} such row(s))")
    if check_files:
        check_audio_files(path, frame)
    return frame



_WARNED_SHORT: set[Path] = set()  # files check_audio_files has warned about in this process



def check_audio_files(path: str | Path, frame: pd.DataFrame, sample_rate: int | None = None) -> None:
    """ManifestError unless every audio file the manifest at `path` lists (its `frame`) exists and decodes:
    its header reads (at `sample_rate`, when given) and its last samples decode, which a truncated file fails
    (~0.5 ms a file). One warning naming a file shorter than the manifest says (its crops are zero-padded)."""
    path = Path(path)
    missing = [name for name in frame["path"] if not (path.parent / name).is_file()]
    if missing:
        raise ManifestError(f"{path}: {len(missing)} of the {len(frame)} audio files it lists are missing "
                            f"(e.g. {path.parent / missing[0]}); rebuild the corpus or fix the manifest")
    bad = []
    for name, seconds in zip(frame["path"], frame["seconds"]):
        problem, frames, rate = _audio_problem(path.parent / name, sample_rate)
        if problem:
            bad.append(f"{path.parent / name}{problem}")
        elif frames < round(seconds * rate) - rate // 100 and (path.parent / name) not in _WARNED_SHORT:
            _WARNED_SHORT.add(path.parent / name)  # every dataset of a run checks the manifest: one warning
            warn(f"{path.parent / name}: {frames / rate:.2f} s long, {path} says {seconds:.2f} s; its crops are "
                  "zero-padded")
    if len(bad) == 1:
        raise ManifestError(f"{bad[0]}; remove it from {path} or rebuild the corpus")
    if bad:
        raise ManifestError(f"{path}: {len(bad)} of the {len(frame)} audio files it lists cannot be used (e.g. "
                            f"{bad[0]}); remove them from the manifest or rebuild the corpus")



def _audio_problem(file: Path, sample_rate: int | None) -> tuple[str | None, int, int]:
    """(why the file cannot be used, as the rest of a line after its name, or None; its frames; its rate)."""
    try:
        with sf.SoundFile(str(file)) as audio:
            if sample_rate and audio.samplerate != sample_rate:
                return f" is {audio.samplerate} Hz, not the requested {sample_rate} Hz", 0, 0
            audio.seek(max(audio.frames - 256, 0))
            audio.read(256, dtype="float32")
            return None, audio.frames, audio.samplerate
    except (RuntimeError, OSError, ValueError) as error:  # soundfile's LibsndfileError is a RuntimeError
        return f": undecodable ({decode_failure(error)})", 0, 0
