"""`studylib corpus`: build the study's 24 kHz mono audio corpus and its manifest.

Audio comes from pinned Debian packages (fetched with `apt-get download` and unpacked, never installed),
from local synthesis tools (festival, espeak-ng, fluidsynth) or from a folder of the user's own files.
Every clip is mixed to mono, resampled, trimmed and loudness-normalised, then cut (or, for short clips,
joined) into ~10 s FLAC segments listed in `manifest.csv` with their split, kind, group, source and
license. Splits are disjoint by group (language, voice pack, synthetic voice or album), so the test set
is unseen. The packages (with their licenses) and the recipe's numbers are defined below (`PROFILES`,
`RECIPE`); their pinned versions, sizes and hashes are in corpus_pins.txt.
"""

from __future__ import annotations

import argparse
import bisect
import functools
import hashlib
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import as_completed
from dataclasses import asdict, dataclass, replace
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
import soxr
from tqdm import tqdm

from studylib.core import processes
from studylib.core.config import UserError, check_option
from studylib.core.storage import atomic_write, warn
from studylib.model.codec import SAMPLE_RATE
from studylib.training.manifest import (
    COLUMNS,
    KINDS,
    SPLITS,
    CorpusError,
    decode_failure,
)

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")
APT_INSTALL = "apt-get install -y --no-install-recommends"


class EmptySplitError(CorpusError):
    def __init__(self, split: str, where: str):
        super().__init__(f"split {split!r} is empty: no usable audio was assigned to it ({where})")
        self.split = split


@dataclass(frozen=True)
class Recipe:
    """Processing parameters. They are part of every segment folder's cache key, so changing one
    re-processes the audio instead of silently mixing two recipes in one corpus."""

    trim_db: float = -45.0  # leading/trailing silence and "active" frames, re. the clip's peak
    target_dbfs: float = -23.0  # RMS of the active frames
    peak: float = 0.95
    frame_s: float = 0.02
    segment_s: float = 10.0
    gap_s: float = 0.25  # between short clips joined into one segment
    min_segment_s: float = 1.0  # the dataset's default crop: shorter leftovers are dropped
    min_clip_s: float = 0.1


RECIPE = Recipe()


@dataclass(frozen=True)
class PackageSource:
    """Audio files inside one pinned Debian package.

    `pattern` is matched against paths inside the package; its `group` capture names the group,
    otherwise the whole source is one group (an album)."""

    name: str
    package: str
    kind: str
    license: str
    pattern: str
    group_cap_s: float  # raw seconds taken per group, from a fixed shuffle of its files
    file_cap_s: float | None = None  # longer files give their middle; MIDI renders stop here
    tool: str | None = None  # synthesis tool the files need (MIDI: fluidsynth)


@dataclass(frozen=True)
class SynthSource:
    """Text-to-speech over offline licence and documentation text; one group per voice."""

    name: str  # the tool: festival | espeak-ng
    voices: tuple[str, ...]
    license: str
    group_cap_s: float
    kind: str = "speech"


@dataclass(frozen=True)
class SynthText:
    tool: str
    voice: str
    text: str


@dataclass(frozen=True)
class GroupJob:
    """All the clips of one group of one source; processed as a unit into `folder`."""

    source: str
    kind: str
    group: str
    split: str
    license: str
    inputs: tuple[Path | SynthText, ...]
    file_cap_s: float | None
    folder: Path  # audio/<source>/<group>-<cache key>
    est_s: float  # for scheduling the longest jobs first


@dataclass(frozen=True)
class GroupResult:
    job: GroupJob
    segments: list[tuple[Path, float]]  # (file, seconds)
    skipped: list[str]  # "file: reason" for each clip that failed to decode or synthesize
    files_skipped: int  # input files (clips) among `skipped`: the rest are notes on the group's leftovers


# Which split each group belongs to; every group not named here is train. Languages are split as a
# whole because one volunteer may have recorded the same language for TuxPaint, KLettres and Asterisk.
# fr and bg are the cleanest recordings (corpus-sources.md); nl and he add unseen languages to test.
GROUP_SPLITS = {
    **{lang: "test" for lang in ("fr", "bg", "nl", "he")},
    **{lang: "valid" for lang in ("da", "lt")},
    **{pack: "test" for pack in ("Pirate", "Singer")},  # hedgewars voice packs
    **{pack: "valid" for pack in ("Mobster", "Surfer")},
    "drascula-music": "test",  # albums
    "planetblupi-music-midi": "test",
    "singularity-music": "valid",
    "sound-icons": "valid",  # the ci profile's only valid split without synthesis tools
    "espeak-ng:en-gb-scotland+f3": "valid",
    "espeak-ng:en-gb-x-rp+m3": "valid",
    "espeak-ng:en-029+m7": "test",
}

FESTIVAL_VOICE = "cmu_us_slt_arctic_hts"
FESTIVAL_VOICE_DIR = Path("/usr/share/festival/voices/us") / FESTIVAL_VOICE
SOUNDFONTS = ("/usr/share/sounds/sf2/TimGM6mb.sf2", "/usr/share/sounds/sf2/default-GM.sf2")
TOOL_PACKAGES = {
    "festival": "festival festvox-us-slt-hts",
    "espeak-ng": "espeak-ng",
    "fluidsynth": "fluidsynth timgm6mb-soundfont",
}
WORDS_PER_S = 2.7  # measured: festival slt 2.65, espeak-ng 3.1
CHUNK_WORDS = 80  # ~30 s of speech per synthesis call

# MIDI songs, rendered with fluidsynth: the first 20 s of each (planetblupi's loop for ~25 min).
OPENMSX = PackageSource("openttd-openmsx", "openttd-openmsx", "music", "GPL-2",
                        r"usr/share/games/openttd/baseset/openmsx/[^/]+\.mid$", group_cap_s=300.0,
                        file_cap_s=20.0, tool="fluidsynth")
PLANETBLUPI = PackageSource("planetblupi-music-midi", "planetblupi-music-midi", "music", "GPL-3+",
                            r"usr/share/planetblupi/music/[^/]+\.mid$", group_cap_s=200.0,
                            file_cap_s=20.0, tool="fluidsynth")

PROFILES: dict[str, tuple[PackageSource | SynthSource, ...]] = {
    # 3.3 MB of packages (+20 MB of tools on a fresh machine). No full-band real speech: klettres-data
    # alone is 39.5 MB. Without the tools only asterisk (train/test) and sound-icons (valid) remain.
    "ci": (
        PackageSource("asterisk-prompt-es-co", "asterisk-prompt-es-co", "speech", "GPL-2",
                      r"usr/share/asterisk/sounds/(?P<group>es)/.+\.gsm$", group_cap_s=240.0),
        PackageSource("asterisk-prompt-fr-armelle", "asterisk-prompt-fr-armelle", "speech", "BSD-style",
                      r"usr/share/asterisk/sounds/(?P<group>fr)/.+\.gsm$", group_cap_s=180.0),
        PackageSource("sound-icons", "sound-icons", "music", "GPL-2+",
                      r"usr/share/sounds/sound-icons/[^/]+\.wav$", group_cap_s=60.0),
        OPENMSX,
        PLANETBLUPI,
        SynthSource("festival", (FESTIVAL_VOICE,), "EST-2003 (voice); text: Debian common-licenses, PSF-2.0",
                    group_cap_s=180.0),
        SynthSource("espeak-ng", ("en-us+m1", "en-gb+f2", "en-gb-scotland+f3", "en-gb-x-rp+m3", "en-029+m7"),
                    "GPL-3+ (voice); text: Debian common-licenses, PSF-2.0", group_cap_s=90.0),
    ),
    # The "lean" recipe: ~110 min, language-, pack- and album-disjoint splits.
    "study": (
        PackageSource("tuxpaint-stamps-default", "tuxpaint-stamps-default", "speech", "GPL-2",
                      r"usr/share/tuxpaint/stamps/.+_desc_(?P<group>[a-z]{2,3})(?:_[A-Z]{2})?\.(?:ogg|wav)$",
                      group_cap_s=180.0),
        PackageSource("klettres-data", "klettres-data", "speech", "GPL-2+",
                      r"usr/share/klettres/(?P<group>[a-z]{2,3})(?:_[A-Z]{2})?/.+\.ogg$", group_cap_s=90.0),
        # Default_es/_pl/... and Russian_pl may share an actor with their base pack: one group each.
        PackageSource("hedgewars-voices", "hedgewars-data", "speech", "GFDL-1.3",
                      r"usr/share/games/hedgewars/Data/Sounds/voices/(?P<group>[A-Za-z]+)(?:_[a-z]{2})?/[^/]+\.ogg$",
                      group_cap_s=120.0),
        PackageSource("hedgewars-music", "hedgewars-data", "music", "GPL-2",
                      r"usr/share/games/hedgewars/Data/Music/[^/]+\.ogg$", group_cap_s=1200.0,
                      file_cap_s=45.0),
        PackageSource("singularity-music", "singularity-music", "music", "CC-BY-SA-3.0",
                      r"usr/share/games/singularity/music/.+\.ogg$", group_cap_s=720.0, file_cap_s=45.0),
        PackageSource("drascula-music", "drascula-music", "music", "Drascula-License (BSD-like freeware)",
                      r"usr/share/scummvm/drascula/audio/[^/]+\.ogg$", group_cap_s=600.0, file_cap_s=30.0),
        PackageSource("sonic-pi-samples", "sonic-pi-samples", "music", "CC0 (some CC-BY-SA-4.0, MIT)",
                      r"usr/share/sonic-pi/samples/[^/]+\.flac$", group_cap_s=600.0),
        OPENMSX,
        PLANETBLUPI,
    ),
}


# ---------------------------------------------------------------------------------------------- API


def build_corpus(
    profile: str,
    out_dir: Path = Path("data"),
    audio_dir: Path | None = None,
    *,
    kind: str = "speech",
    jobs: int | None = None,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
) -> Path:
    """Build `out_dir/<profile>/manifest.csv` (and its segments) and return the manifest's path.

    With `audio_dir`, the user's files replace the packaged sources and `profile` only names the output
    folder. Downloads, unpacked packages and processed groups are cached, so a re-run is cheap."""
    started = time.monotonic()
    out_dir = Path(out_dir)
    profile_dir = out_dir / _check_profile(profile, audio_dir)
    audio_root = profile_dir / "audio"
    fresh = [folder for folder in (profile_dir, out_dir) if not folder.exists()]
    try:
        if audio_dir is None:
            planned, downloaded = _plan_profile(PROFILES[profile], out_dir / "cache", audio_root)
        else:
            planned, downloaded = _plan_audio_dir(Path(audio_dir), kind, audio_root, fractions), 0
        results = _run_jobs(planned, jobs or os.cpu_count() or 1)
        for result in results:
            for message in result.skipped:
                warn(f"skipped {message}")
        if audio_dir is not None:  # a group whose every file was bad must not leave its split empty
            results = _resplit(results, fractions)
        frame = _manifest_frame(profile_dir, results)
    except CorpusError:
        # a first build that cannot make a corpus leaves nothing behind (downloads in out_dir/cache stay)
        if profile_dir in fresh:
            shutil.rmtree(profile_dir, ignore_errors=True)
        if out_dir in fresh and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise
    manifest = profile_dir / "manifest.csv"
    # Written last and atomically, so a manifest only ever names segments that exist.
    atomic_write(manifest, lambda p: frame.to_csv(p, index=False))
    _remove_stale(audio_root, {result.job.folder for result in results})
    _print_summary(frame, downloaded, time.monotonic() - started)
    files = sum(len(result.job.inputs) for result in results)
    skipped = sum(result.files_skipped for result in results)
    # the last line: where the manifest is (with --audio-dir, under the profile's name) and what went into it
    print(f"wrote {manifest}: {files - skipped} files in, {skipped} skipped ({len(frame)} segments)")
    return manifest


def _resplit(results: list[GroupResult], fractions: tuple[float, float, float]) -> list[GroupResult]:
    """The groups that yielded segments, split again by `_hash_splits` among themselves: a group keeps its
    split unless its split would be empty without the groups that yielded none (relabelling is free: the
    split is not part of a group's cache key)."""
    alive = sorted(result.job.group for result in results if result.segments)
    splits = _hash_splits(alive, fractions)
    return [replace(result, job=replace(result.job, split=splits[result.job.group]))
            if result.job.group in splits else result for result in results]


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="studylib corpus", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", help="ci or study; with --audio-dir, the output's name (default custom)")
    parser.add_argument("--audio-dir", type=Path, help="build from this folder of wav/flac/ogg files instead")
    parser.add_argument("--kind", choices=KINDS, default="speech", help="kind of the --audio-dir files")
    parser.add_argument("--out", type=Path, default=Path("data"), help="output and cache folder (data)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes")
    args = parser.parse_args(argv)
    profile = args.profile or ("custom" if args.audio_dir else None)
    if profile is None:
        parser.error(f"--profile is required: one of {', '.join(PROFILES)} (or pass --audio-dir)")
    try:
        check_option("--jobs", args.jobs, 1, integer=True)
        build_corpus(profile, args.out, args.audio_dir, kind=args.kind, jobs=args.jobs)
    except (CorpusError, UserError) as error:
        print(f"studylib corpus: error: {error}", file=sys.stderr)
        return 2
    return 0


# ------------------------------------------------------------------------------------------ planning


def _check_profile(profile: str, audio_dir: Path | None) -> str:
    if audio_dir is None and profile not in PROFILES:
        raise CorpusError(f"unknown profile {profile!r}; choose {' or '.join(PROFILES)}, or pass --audio-dir")
    if audio_dir is not None and (profile in PROFILES or not re.fullmatch(r"[\w.-]+", profile)):
        raise CorpusError(f"--audio-dir output needs its own folder name, not {profile!r} (e.g. custom)")
    return profile


def _plan_profile(
    sources: Iterable[PackageSource | SynthSource], cache: Path, audio_root: Path
) -> tuple[list[GroupJob], int]:
    planned: list[GroupJob] = []
    downloaded = 0
    roots: dict[str, Path | None] = {}
    for source in tqdm(sources, desc="sources", unit="source"):
        tool = source.name if isinstance(source, SynthSource) else source.tool
        if tool and (problem := _tool_problem(tool)):
            warn(f"{problem}; skipping {source.name}. Install it with: {APT_INSTALL} {TOOL_PACKAGES[tool]}")
            continue
        if isinstance(source, SynthSource):
            planned += _plan_synth(source, audio_root)
            continue
        if source.package not in roots:
            roots[source.package], size = _fetch(source.package, cache)
            downloaded += size
        if (root := roots[source.package]) is not None:
            planned += _plan_package(source, root, audio_root)
    return planned, downloaded


def _plan_package(source: PackageSource, root: Path, audio_root: Path) -> list[GroupJob]:
    pattern = re.compile(source.pattern)
    groups: dict[str, list[Path]] = defaultdict(list)
    for folder, _, names in os.walk(root):
        for name in names:
            relative = os.path.relpath(os.path.join(folder, name), root)
            if match := pattern.search(relative):
                groups[match.groupdict().get("group") or source.name].append(Path(folder, name))
    jobs = []
    for group, files in sorted(groups.items()):
        # A fixed shuffle, so a capped group samples the whole package rather than its first folder.
        files.sort(key=lambda path: _digest(str(path.relative_to(root))))
        inputs, est_s = _take(files, source.group_cap_s, source.file_cap_s)
        jobs.append(_job(audio_root, source.name, source.kind, source.license, group, inputs,
                         file_cap_s=source.file_cap_s, est_s=est_s))
    return jobs


def _take(files: list[Path], cap_s: float, file_cap_s: float | None) -> tuple[tuple[Path, ...], float]:
    """The first files whose (capped) durations reach `cap_s`, read from the headers only."""
    taken: list[Path] = []
    total = 0.0
    for path in files:
        if total >= cap_s:
            break
        try:
            seconds = file_cap_s if path.suffix == ".mid" else sf.info(str(path)).duration
        except (RuntimeError, ValueError, OSError) as error:
            warn(f"skipped {path}: {error}")
            continue
        taken.append(path)
        total += min(seconds, file_cap_s or seconds)
    return tuple(taken), total


def _plan_synth(source: SynthSource, audio_root: Path) -> list[GroupJob]:
    jobs = []
    for voice in source.voices:
        group = f"{source.name}:{voice}"
        # Each voice reads its own sample of sentences, so valid/test voices do not repeat train text.
        chosen: list[tuple[int, str]] = []  # (chunk index, sentence)
        words = 0
        for sentence in sorted(_tts_sentences(), key=lambda sentence: _digest(group + sentence)):
            if words >= source.group_cap_s * WORDS_PER_S:
                break
            chosen.append((words // CHUNK_WORDS, sentence))
            words += len(sentence.split())
        inputs = tuple(SynthText(source.name, voice, " ".join(s for _, s in chunk))
                       for _, chunk in itertools.groupby(chosen, key=lambda pair: pair[0]))
        jobs.append(_job(audio_root, source.name, source.kind, source.license, group, inputs,
                         est_s=source.group_cap_s))
    return jobs


def _plan_audio_dir(
    audio_dir: Path, kind: str, audio_root: Path, fractions: tuple[float, float, float]
) -> list[GroupJob]:
    if not audio_dir.is_dir():
        raise CorpusError(f"--audio-dir {audio_dir} is not a folder")
    groups: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(audio_dir.rglob("*")):
        if path.suffix.lower() in AUDIO_SUFFIXES and path.is_file():
            relative = path.relative_to(audio_dir)
            # LibriSpeech/VCTK layout: the first folder is the speaker; a loose file is its own group.
            groups[relative.parts[0] if len(relative.parts) > 1 else relative.stem].append(path)
    if not groups:
        raise CorpusError(f"no {'/'.join(AUDIO_SUFFIXES)} files under {audio_dir}")
    splits = _hash_splits(sorted(groups), fractions)
    name = audio_dir.resolve().name
    return [_job(audio_root, name, kind, "user-supplied", group, tuple(files), split=splits[group])
            for group, files in groups.items()]


def _hash_splits(groups: list[str], fractions: tuple[float, float, float]) -> dict[str, str]:
    """Split groups by a hash of their name, so adding a speaker never moves the others; with three or
    more groups, an empty split takes the group nearest its hash interval from the largest split."""
    edges = np.cumsum(fractions) / sum(fractions)
    position = {group: int(_digest(group)[:12], 16) / 16**12 for group in groups}
    split = {group: SPLITS[min(bisect.bisect(edges, position[group]), 2)] for group in groups}
    if len(groups) >= 3:
        for index, empty in enumerate(SPLITS):
            if empty in split.values():
                continue
            centre = (edges[index] + (edges[index - 1] if index else 0.0)) / 2
            donor = max(SPLITS, key=list(split.values()).count)
            moved = min((g for g in groups if split[g] == donor), key=lambda g: abs(position[g] - centre))
            split[moved] = empty
    return split


def _job(
    audio_root: Path,
    source: str,
    kind: str,
    license: str,
    group: str,
    inputs: tuple[Path | SynthText, ...],
    *,
    file_cap_s: float | None = None,
    est_s: float = 0.0,
    split: str | None = None,
) -> GroupJob:
    # The key covers everything that changes the audio (not split or license: relabelling is free).
    fingerprint = [SAMPLE_RATE, asdict(RECIPE), source, group, file_cap_s, [_fingerprint(i) for i in inputs]]
    folder = audio_root / _safe(source) / f"{_safe(group)}-{_digest(json.dumps(fingerprint))[:12]}"
    return GroupJob(source, kind, group, split or GROUP_SPLITS.get(group, "train"), license, inputs,
                    file_cap_s, folder, est_s)


def _fingerprint(item: Path | SynthText) -> object:
    if isinstance(item, SynthText):
        return asdict(item)
    stat = item.stat()
    extra = _soundfont() if item.suffix == ".mid" else None
    return [str(item), stat.st_size, stat.st_mtime_ns, extra]


@functools.cache
def _tts_sentences() -> tuple[str, ...]:
    """Plain English sentences from the offline texts every Debian/Python install has."""
    from pydoc_data.topics import topics  # CPython's help texts (~65k words)

    texts = list(topics.values())
    licenses = Path("/usr/share/common-licenses")  # ~48k words on Debian
    if licenses.is_dir():
        texts += [path.read_text(errors="replace") for path in sorted(licenses.iterdir())
                  if not path.is_symlink()]
    plain = re.compile(r"[A-Z][A-Za-z ,;'-]+[.!?]")  # no code, markup or numbers, which TTS reads badly
    sentences = dict.fromkeys(
        sentence
        for text in texts
        for sentence in re.split(r"(?<=[.!?])\s+", " ".join(text.split()))
        if plain.fullmatch(sentence) and 6 <= len(sentence.split()) <= 30
    )
    return tuple(sentences)


# ---------------------------------------------------------------------------------------- packages


@functools.cache
def _pins() -> dict[str, tuple[str, int, str]]:
    """package -> (version, size, sha256) from the pins shipped with the package."""
    pins = {}
    for line in (resources.files("studylib.study") / "corpus_pins.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            spec, size, sha256 = line.split()
            package, version = spec.split("=", 1)
            pins[package] = (version, int(size), sha256)
    return pins


def _fetch(package: str, cache: Path) -> tuple[Path | None, int]:
    """Download, verify and unpack a pinned package; return (unpacked root or None, bytes downloaded)."""
    version, size, sha256 = _pins()[package]
    unpacked = cache / "unpacked" / _safe(f"{package}_{version}")
    if unpacked.is_dir():
        return unpacked, 0
    missing = [tool for tool in ("apt-get", "dpkg-deb") if shutil.which(tool) is None]
    if missing:
        warn(f"{' and '.join(missing)} not found (not Debian?): skipping {package}; use --audio-dir instead")
        return None, 0
    deb = cache / "debs" / _safe(f"{package}_{version}.deb")
    downloaded = 0
    if not deb.is_file():
        deb.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=deb.parent) as tmp:
            done = subprocess.run(["apt-get", "download", f"{package}={version}"], cwd=tmp,
                                  capture_output=True, text=True)
            fetched = list(Path(tmp).glob("*.deb"))
            if done.returncode or len(fetched) != 1:
                reason = (done.stderr.strip().splitlines() or ["no .deb written"])[-1]
                warn(f"apt-get download {package}={version} failed ({reason}); skipping it "
                      "(on a fresh machine run `apt-get update` as root first)")
                return None, 0
            _verify(fetched[0], package, size, sha256)
            os.replace(fetched[0], deb)
            downloaded = size
    unpacked.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=unpacked.parent, prefix=".unpacking-"))
    try:
        done = subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], capture_output=True, text=True)
        if done.returncode:  # a full disk, most often: one line naming the package and the folder, not a traceback
            reason = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
            raise CorpusError(f"{package}: dpkg-deb could not unpack it into {unpacked.parent} ({reason}); "
                              "free some space there or choose another --out")
        os.replace(tmp, unpacked)  # whole or not at all: an interrupted unpack is never reused
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return unpacked, downloaded


def _verify(deb: Path, package: str, size: int, sha256: str) -> None:
    digest = hashlib.sha256()
    with deb.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    if deb.stat().st_size != size or digest.hexdigest() != sha256:
        raise CorpusError(f"{package}: the downloaded .deb does not match its size/sha256 in corpus_pins.txt")


# ------------------------------------------------------------------------------------------- tools


def _tool_problem(tool: str) -> str | None:
    """Why `tool` cannot run here, or None when it can."""
    if tool == "festival":
        if shutil.which("text2wave") is None:
            return "festival (text2wave) not found"
        if not FESTIVAL_VOICE_DIR.is_dir():
            return f"festival voice {FESTIVAL_VOICE} not found"
    elif shutil.which(tool) is None:
        return f"{tool} not found"
    elif tool == "fluidsynth" and _soundfont() is None:
        return "no General MIDI soundfont for fluidsynth"
    return None


def _soundfont() -> str | None:
    return next((path for path in SOUNDFONTS if Path(path).is_file()), None)


def _synthesize(item: SynthText) -> tuple[np.ndarray, int]:
    with tempfile.TemporaryDirectory() as tmp:
        text, wav = Path(tmp, "text.txt"), Path(tmp, "speech.wav")
        text.write_text(item.text)
        if item.tool == "festival":
            command = ["text2wave", "-eval", f"(voice_{item.voice})", str(text), "-o", str(wav)]
        else:
            command = ["espeak-ng", "-v", item.voice, "-f", str(text), "-w", str(wav)]
        subprocess.run(command, check=True, capture_output=True, timeout=600)
        return sf.read(str(wav), dtype="float32", always_2d=True)


def _render_midi(path: Path, seconds: float | None) -> tuple[np.ndarray, int]:
    """Render a MIDI file with fluidsynth, reading at most `seconds` from its pipe: some songs loop
    for half an hour."""
    command = ["fluidsynth", "-ni", "-q", "-g", "0.5", "-r", str(SAMPLE_RATE), "-T", "raw", "-O", "s16",
               "-F", "-", str(_soundfont()), str(path)]
    limit = -1 if seconds is None else int(seconds * SAMPLE_RATE) * 4  # stereo, 16 bit
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as process:
        raw = process.stdout.read(limit)
        process.kill()
    if len(raw) < 4:
        raise RuntimeError("fluidsynth rendered no audio")
    pcm = np.frombuffer(raw[: len(raw) // 4 * 4], dtype=np.int16).reshape(-1, 2)
    return pcm.astype(np.float32) / 32768, SAMPLE_RATE


# -------------------------------------------------------------------------------------- processing


def _run_jobs(planned: list[GroupJob], jobs: int) -> list[GroupResult]:
    planned = sorted(planned, key=lambda job: -job.est_s)  # longest first: better packing on few cores
    progress = tqdm(total=len(planned), desc="groups", unit="group")
    try:
        if jobs == 1:
            results = []
            for job in planned:
                results.append(_process(job))
                progress.update()
        else:
            # Workers ignore Ctrl-C and die quietly of SIGTERM (processes.worker_pool): the parent stops them
            # and says so in one line.
            pool = processes.worker_pool(jobs)
            with pool:
                try:
                    with processes.signals_held():  # the workers are forked here
                        futures = [pool.submit(_process, job) for job in planned]
                    for _ in as_completed(futures):
                        progress.update()
                    results = [future.result() for future in futures]
                except BaseException:
                    pool.shutdown(wait=False, cancel_futures=True)
                    processes.stop_workers()  # gone before its half-built group folder is removed below
                    raise
    except BaseException:  # interrupted or failed: no half-built group folder stays behind
        for job in planned:
            for tmp in job.folder.parent.glob(f"{job.folder.name}.tmp*"):
                shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        progress.close()
    return results


def _process(job: GroupJob) -> GroupResult:
    """Turn one group's clips into segments, reusing them if this exact job was done before.

    Segments are written to a temporary folder that is renamed into place when complete, so a
    folder that exists is whole; `segments.json` records what it holds."""
    index = job.folder / "segments.json"
    if not index.is_file():
        tmp = job.folder.with_name(f"{job.folder.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            _segment(job, tmp)
        except BaseException:  # a full disk, a signal: no half-written group folder
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        os.replace(tmp, job.folder)
    record = json.loads(index.read_text())
    segments = [(job.folder / name, frames / SAMPLE_RATE) for name, frames in record["segments"]]
    # segments.json of groups built before the count was kept: every note but the leftover one names a file
    files_skipped = record.get("files_skipped", sum(not note.startswith("group ") for note in record["skipped"]))
    return GroupResult(job, segments, record["skipped"], files_skipped)


def _segment(job: GroupJob, folder: Path) -> None:
    """Write one group's segments into `folder`, and segments.json: what it holds and why clips were skipped."""
    writer = _SegmentWriter(folder)
    skipped = []
    for item in job.inputs:
        try:
            audio, rate = _load(item, job.file_cap_s)
        except (RuntimeError, ValueError, OSError, subprocess.SubprocessError) as error:
            skipped.append(f"{_describe(item)}: {_load_failure(item, error)}")
            continue
        # Say why a clip is not used rather than crash on it (NaN) or drop it without a word.
        if problem := _unusable(audio, rate):
            skipped.append(f"{_describe(item)}: {problem}")
        elif (clip := _prepare(audio, rate)) is not None:
            writer.add(clip)
    writer.flush()
    files_skipped = len(skipped)  # one note per bad file so far; the leftover note below names none
    if writer.dropped_s:
        skipped.append(f"group {job.group} of {job.source}: {writer.dropped_s:.2f} s of short clips left "
                       f"over, under min_segment_s = {RECIPE.min_segment_s:g} s; not used")
    (folder / "segments.json").write_text(json.dumps({"segments": writer.segments, "skipped": skipped,
                                                      "files_skipped": files_skipped}))


def _describe(item: Path | SynthText) -> str:
    return str(item) if isinstance(item, Path) else f"{item.tool} {item.voice} ({item.text[:40]}...)"


def _load_failure(item: Path | SynthText, error: Exception) -> str:
    """Why a clip could not be read, as one line (libsndfile's message names the file again: dropped)."""
    reason = decode_failure(error)
    if isinstance(item, SynthText):
        return f"synthesis failed ({reason})"
    return f"{'could not be rendered' if item.suffix == '.mid' else 'undecodable'} ({reason})"


def _unusable(audio: np.ndarray, rate: int) -> str | None:
    """Why a decoded clip cannot go into the corpus, or None if it can."""
    if audio.size == 0:
        return "empty (no samples)"
    if not np.isfinite(audio).all():
        return "holds NaN or Inf samples"
    mono = audio.mean(axis=1)
    if not mono.any():
        return "silent (every sample is zero)"
    if _trim(mono).size < RECIPE.min_clip_s * rate:
        return f"too short: under min_clip_s = {RECIPE.min_clip_s:g} s of sound once silence is trimmed"
    return None


def _load(item: Path | SynthText, file_cap_s: float | None) -> tuple[np.ndarray, int]:
    """(frames x channels float32, sample rate) for a file, a MIDI render or a synthesized text."""
    if isinstance(item, SynthText):
        return _synthesize(item)
    if item.suffix == ".mid":
        return _render_midi(item, file_cap_s)
    with sf.SoundFile(str(item)) as audio:
        frames = audio.frames
        if file_cap_s is not None and frames > file_cap_s * audio.samplerate:
            # Decode only the middle of a long track (intros are often quiet): most of the build time.
            audio.seek((frames - int(file_cap_s * audio.samplerate)) // 2)
            frames = int(file_cap_s * audio.samplerate)
        return audio.read(frames, dtype="float32", always_2d=True), audio.samplerate


def _prepare(audio: np.ndarray, rate: int) -> np.ndarray | None:
    """Mono, trimmed, 24 kHz and loudness-normalised; None if (nearly) silent."""
    mono = _trim(audio.mean(axis=1))
    if mono.size < RECIPE.min_clip_s * rate:
        return None
    if rate != SAMPLE_RATE:
        mono = soxr.resample(mono, rate, SAMPLE_RATE, quality="HQ")
    return _normalise(mono)


def _trim(x: np.ndarray) -> np.ndarray:
    if not x.any():
        return x[:0]
    loud = np.flatnonzero(np.abs(x) >= np.abs(x).max() * 10 ** (RECIPE.trim_db / 20))
    return x[loud[0] : loud[-1] + 1]


def active_rms(x: np.ndarray) -> float:
    """RMS over the frames within `trim_db` of the peak: the loudness the corpus normalises."""
    n = int(RECIPE.frame_s * SAMPLE_RATE)
    frames = x[: max(x.size // n, 1) * n].reshape(-1, min(n, x.size))
    rms = np.sqrt(np.mean(np.square(frames, dtype=np.float64), axis=1))
    return float(np.sqrt(np.mean(np.square(rms[rms >= np.abs(x).max() * 10 ** (RECIPE.trim_db / 20)]))))


def _normalise(x: np.ndarray) -> np.ndarray:
    gain = min(10 ** (RECIPE.target_dbfs / 20) / active_rms(x), RECIPE.peak / np.abs(x).max())
    return (x * gain).astype(np.float32)


class _SegmentWriter:
    """Cuts long clips into equal pieces of at most segment_s and joins short clips with gaps up to
    segment_s, writing FLAC files: every segment is 1-10 s long."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.segments: list[tuple[str, int]] = []  # (file name, frames)
        self.pending: list[np.ndarray] = []
        self.gap = np.zeros(int(RECIPE.gap_s * SAMPLE_RATE), dtype=np.float32)
        self.size = int(RECIPE.segment_s * SAMPLE_RATE)
        self.dropped_s = 0.0  # joined short clips under min_segment_s: reported, not used

    def add(self, clip: np.ndarray) -> None:
        if clip.size >= self.size:
            for piece in np.array_split(clip, -(-clip.size // self.size)):  # ceil: pieces of 5-10 s
                self._write(piece)
            return
        pending = sum(part.size for part in self.pending) + self.gap.size * len(self.pending)
        if pending + clip.size > self.size:
            self.flush()
        self.pending.append(clip)

    def flush(self) -> None:
        if self.pending:
            joined = np.concatenate([part for clip in self.pending for part in (self.gap, clip)][1:])
            self.pending = []
            if joined.size >= RECIPE.min_segment_s * SAMPLE_RATE:
                self._write(joined)
            else:
                self.dropped_s += joined.size / SAMPLE_RATE

    def _write(self, audio: np.ndarray) -> None:
        name = f"{len(self.segments):04d}.flac"
        sf.write(str(self.folder / name), audio, SAMPLE_RATE, subtype="PCM_16")
        self.segments.append((name, int(audio.size)))


# ---------------------------------------------------------------------------------------- manifest


def _manifest_frame(profile_dir: Path, results: list[GroupResult]) -> pd.DataFrame:
    rows = [
        (path.relative_to(profile_dir).as_posix(), r.job.split, r.job.kind, r.job.group, r.job.source,
         r.job.license, seconds)
        for r in results
        for path, seconds in r.segments
    ]
    if not rows:
        files = sum(len(r.job.inputs) for r in results)
        raise CorpusError(f"no usable audio: all {files} input files were skipped (see the warnings above)")
    frame = pd.DataFrame(rows, columns=COLUMNS).sort_values(["split", "kind", "source", "group", "path"])
    for split in SPLITS:
        if not (frame["split"] == split).any():
            raise EmptySplitError(split, f"{len(results)} groups built for {profile_dir}")
    return frame


def _remove_stale(audio_root: Path, keep: set[Path]) -> None:
    """Delete segment folders the new manifest no longer names (old recipes, interrupted builds)."""
    for source_dir in audio_root.iterdir():
        for folder in source_dir.iterdir():
            if folder not in keep:
                shutil.rmtree(folder)
        if not any(source_dir.iterdir()):
            source_dir.rmdir()


def _print_summary(frame: pd.DataFrame, downloaded: int, seconds: float) -> None:
    minutes = frame.pivot_table(index="split", columns="kind", values="seconds", aggfunc="sum")
    minutes = (minutes.reindex(SPLITS).fillna(0.0) / 60).round(1)
    minutes["total"] = minutes.sum(axis=1)
    print(f"\nminutes of audio per split and kind ({len(frame)} segments, "
          f"{downloaded / 1e6:.1f} MB downloaded, built in {seconds:.1f} s):")
    print(minutes.to_string())


# ------------------------------------------------------------------------------------------ helpers


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _safe(name: str) -> str:
    return re.sub(r"[^\w.+-]", "_", name)


