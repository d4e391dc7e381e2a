"""studylib.study.corpus (the corpus builder) and studylib.training.data (the training dataset).

Fast tests build from tiny synthetic trees in `--audio-dir` mode; one slow test builds the real `ci`
profile from Debian packages."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

from studylib.study import corpus
from studylib.study.corpus import EmptySplitError, active_rms, build_corpus
from studylib.training.data import AudioDataset
from studylib.training.manifest import COLUMNS, SPLITS, load_manifest


def _tone(seconds: float, freq: float, amp: float, rate: int, channels: int = 1) -> np.ndarray:
    """A sine with 0.3 s of silence either side (for the trimming), shaped (frames, channels)."""
    t = np.arange(int(seconds * rate)) / rate
    pad = np.zeros(int(0.3 * rate))
    mono = np.concatenate([pad, amp * np.sin(2 * np.pi * freq * t), pad]).astype(np.float32)
    return np.repeat(mono[:, None], channels, axis=1)


def _speaker(root: Path, name: str, index: int) -> None:
    """A LibriSpeech-like speaker folder: short clips at several rates, levels and formats."""
    chapter = root / name / "chapter"
    chapter.mkdir(parents=True)
    for clip in range(3):
        sf.write(chapter / f"{clip}.wav", _tone(1.5 + clip, 200 + 50 * index, 0.01 * 4**clip, 16_000), 16_000)
    sf.write(chapter / "stereo.flac", _tone(2.0, 330, 0.3, 44_100, channels=2), 44_100)


@pytest.fixture
def audio_dir(tmp_path: Path) -> Path:
    root = tmp_path / "my-speech"
    for index in range(6):
        _speaker(root, f"spk{index}", index)
    sf.write(root / "spk0" / "long.ogg", _tone(25.0, 440, 0.5, 22_050), 22_050)  # cut into ~10 s pieces
    (root / "spk1" / "broken.wav").write_bytes(b"RIFF not really a wave file")
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One corpus built from the synthetic tree, shared by the read-only tests."""
    tmp = tmp_path_factory.mktemp("built")
    for index in range(6):
        _speaker(tmp / "my-speech", f"spk{index}", index)
    sf.write(tmp / "my-speech" / "spk0" / "long.ogg", _tone(25.0, 440, 0.5, 22_050), 22_050)
    return build_corpus("custom", tmp / "data", tmp / "my-speech", jobs=1)


def _assert_group_disjoint(frame: pd.DataFrame) -> None:
    splits_of_group = frame.groupby("group")["split"].nunique()
    assert (splits_of_group == 1).all(), splits_of_group[splits_of_group > 1]


def _paths_exist(manifest: Path) -> bool:
    return all((manifest.parent / path).is_file() for path in load_manifest(manifest)["path"])


# ------------------------------------------------------------------------------------- the manifest


def test_manifest_columns_splits_and_groups(built: Path):
    frame = load_manifest(built)
    assert list(frame.columns) == COLUMNS
    assert built == built.parent.parent / "custom" / "manifest.csv"
    assert set(frame["split"]) == set(SPLITS)
    _assert_group_disjoint(frame)
    assert set(frame["group"]) == {f"spk{index}" for index in range(6)}
    assert set(frame["kind"]) == {"speech"} and set(frame["source"]) == {"my-speech"}
    assert set(frame["license"]) == {"user-supplied"}
    assert not any(Path(path).is_absolute() for path in frame["path"])


def test_segments_are_24k_mono_normalised_and_cut(built: Path):
    frame = load_manifest(built)
    for path, seconds in zip(frame["path"], frame["seconds"], strict=True):
        info = sf.info(str(built.parent / path))
        assert (info.samplerate, info.channels, info.format) == (24_000, 1, "FLAC")
        assert info.frames == round(seconds * 24_000)
        audio, _ = sf.read(str(built.parent / path), dtype="float32")
        assert np.abs(audio).max() <= 0.95 + 1 / 32768
        assert -24.0 < 20 * np.log10(active_rms(audio)) < -22.0  # levels from -40 to -6 dBFS went in
    assert 1.0 <= frame["seconds"].min() and frame["seconds"].max() <= 10.0
    # 25 s of one file at 22.05 kHz cut in three, and 9.5 s of short clips joined with 0.25 s gaps.
    spk0 = frame.loc[frame["group"] == "spk0", "seconds"]
    assert len(spk0) == 5 and 34.5 < spk0.sum() < 35.5


def test_peaky_clip_is_limited_not_clipped():
    clicks = np.zeros((16_000, 1), dtype=np.float32)
    clicks[::4000] = 0.5  # active level far below its peak: the peak limit must win
    out = corpus._prepare(clicks, 16_000)
    assert np.abs(out).max() == pytest.approx(0.95, abs=1e-3)
    assert 20 * np.log10(active_rms(out)) < -23.0


def test_rebuild_reuses_everything(built: Path):
    before = built.read_bytes()
    stamps = {path: path.stat().st_mtime_ns for path in built.parent.rglob("*.flac")}
    again = build_corpus("custom", built.parent.parent, built.parent.parent.parent / "my-speech", jobs=1)
    assert again == built and built.read_bytes() == before
    assert {path: path.stat().st_mtime_ns for path in built.parent.rglob("*.flac")} == stamps


def test_undecodable_file_is_reported_and_skipped(audio_dir: Path, tmp_path: Path, capsys):
    manifest = build_corpus("custom", tmp_path / "data", audio_dir, jobs=1)
    assert "broken.wav" in capsys.readouterr().err
    assert _paths_exist(manifest)


def test_interrupted_build_never_leaves_a_dangling_manifest(audio_dir: Path, tmp_path: Path, monkeypatch):
    def interrupt(self, audio):
        raise KeyboardInterrupt

    out = tmp_path / "data"
    with monkeypatch.context() as patch:
        patch.setattr(corpus._SegmentWriter, "_write", interrupt)
        with pytest.raises(KeyboardInterrupt):
            build_corpus("custom", out, audio_dir, jobs=1)
    assert not (out / "custom" / "manifest.csv").exists()

    manifest = build_corpus("custom", out, audio_dir, jobs=1)
    before = manifest.read_bytes()
    sf.write(audio_dir / "spk2" / "chapter" / "0.wav", _tone(2.0, 500, 0.2, 16_000), 16_000)  # spk2 rebuilds
    monkeypatch.setattr(corpus._SegmentWriter, "_write", interrupt)
    with pytest.raises(KeyboardInterrupt):
        build_corpus("custom", out, audio_dir, jobs=1)
    assert manifest.read_bytes() == before and _paths_exist(manifest)

    monkeypatch.undo()
    build_corpus("custom", out, audio_dir, jobs=1)
    assert manifest.read_bytes() != before and _paths_exist(manifest)
    folders = {path.parent for path in (out / "custom" / "audio").rglob("*") if path.is_file()}
    assert len(folders) == 6 and not [path for path in folders if ".tmp" in path.name]  # stale ones removed


def test_empty_split_is_an_error_naming_it(tmp_path: Path, capsys):
    for index in range(2):  # two speakers cannot fill three splits
        _speaker(tmp_path / "two", f"spk{index}", index)
    with pytest.raises(EmptySplitError, match=r"split '(train|valid|test)' is empty") as error:
        build_corpus("custom", tmp_path / "data", tmp_path / "two", jobs=1)
    assert error.value.split in SPLITS
    assert not (tmp_path / "data" / "custom" / "manifest.csv").exists()

    argv = ["--audio-dir", str(tmp_path / "two"), "--out", str(tmp_path / "data"), "--jobs", "1"]
    assert corpus.cli(argv) == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(rf"studylib corpus: error: split '{error.value.split}' is empty.*", message)


def test_cli_builds_and_rejects_bad_profiles(audio_dir: Path, tmp_path: Path, capsys):
    out = tmp_path / "data"
    assert corpus.cli(["--audio-dir", str(audio_dir), "--out", str(out), "--profile", "mine"]) == 0
    assert "minutes of audio per split and kind" in capsys.readouterr().out
    assert _paths_exist(out / "mine" / "manifest.csv")
    assert corpus.cli(["--profile", "nope", "--out", str(out)]) == 2
    assert "unknown profile 'nope'" in capsys.readouterr().err
    assert corpus.cli(["--audio-dir", str(audio_dir), "--profile", "ci", "--out", str(out)]) == 2
    assert corpus.cli(["--audio-dir", str(audio_dir), "--kind", "music", "--out", str(out), "--jobs", "1"]) == 0
    assert set(load_manifest(out / "custom" / "manifest.csv")["kind"]) == {"music"}


def test_hash_splits_are_stable_and_never_empty():
    for count in (3, 4, 5):
        splits = corpus._hash_splits([f"g{i}" for i in range(count)], (0.8, 0.1, 0.1))
        assert set(splits.values()) == set(SPLITS)
    many = corpus._hash_splits([f"speaker{i}" for i in range(200)], (0.8, 0.1, 0.1))
    assert 130 < list(many.values()).count("train") < 185
    more = corpus._hash_splits([f"speaker{i}" for i in range(201)], (0.8, 0.1, 0.1))
    assert all(more[group] == split for group, split in many.items())  # adding a speaker moves no one


def test_missing_tool_prints_the_install_command_and_skips(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setattr(corpus.shutil, "which", lambda name: None)
    source = corpus.SynthSource("espeak-ng", ("en-us",), "GPL-3+", group_cap_s=10.0)
    assert corpus._plan_profile([source], tmp_path / "cache", tmp_path / "audio") == ([], 0)
    assert "apt-get install -y --no-install-recommends espeak-ng" in capsys.readouterr().err


def test_package_groups_follow_the_split_rules(tmp_path: Path):
    """Languages (across packages) and voice packs are wholly one split; odd file names are handled."""
    files = [
        "usr/share/tuxpaint/stamps/animals/cat_desc_fr.ogg",
        "usr/share/tuxpaint/stamps/food/corn_desc_pt_BR.wav",
        "usr/share/tuxpaint/stamps/town/inukshuk_desc_da.ogg.ogg",  # a packaging slip: not matched
        "usr/share/tuxpaint/stamps/animals/cat.ogg",  # a sound effect, not a description
        "usr/share/klettres/fr/alpha/a.ogg",
        "usr/share/klettres/en_GB/syllab/ba.ogg",
        "usr/share/games/hedgewars/Data/Sounds/voices/Default/Boom.ogg",
        "usr/share/games/hedgewars/Data/Sounds/voices/Default_es/Boom.ogg",  # maybe the same actor
        "usr/share/games/hedgewars/Data/Sounds/voices/Pirate/Boom.ogg",
    ]
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        sf.write(tmp_path / name, _tone(0.5, 300, 0.1, 16_000), 16_000, format="WAV" if "wav" in name else "OGG")
    planned = {
        (job.source, job.group): (job.split, len(job.inputs))
        for source in corpus.PROFILES["study"][:3]
        for job in corpus._plan_package(source, tmp_path, tmp_path / "audio")
    }
    assert planned == {
        ("tuxpaint-stamps-default", "fr"): ("test", 1),
        ("tuxpaint-stamps-default", "pt"): ("train", 1),
        ("klettres-data", "fr"): ("test", 1),
        ("klettres-data", "en"): ("train", 1),
        ("hedgewars-voices", "Default"): ("train", 2),
        ("hedgewars-voices", "Pirate"): ("test", 1),
    }
    packaged = {s.package for p in corpus.PROFILES.values() for s in p if isinstance(s, corpus.PackageSource)}
    assert packaged <= set(corpus._pins())


@pytest.mark.slow
def test_ci_profile_builds_from_debian_packages(ci_data: Path):
    manifest = ci_data / "ci" / "manifest.csv"
    frame = load_manifest(manifest)
    assert _paths_exist(manifest)
    assert set(frame["split"]) == set(SPLITS)
    sources = set(frame["source"])
    # Real 8 kHz speech needs no tools: Colombian Spanish trains, French (an unseen language) tests.
    assert {"asterisk-prompt-es-co", "asterisk-prompt-fr-armelle", "sound-icons"} <= sources
    assert set(frame.loc[frame["source"] == "asterisk-prompt-fr-armelle", "split"]) == {"test"}
    _assert_group_disjoint(frame)
    if corpus._tool_problem("fluidsynth") is None:
        assert {"openttd-openmsx", "planetblupi-music-midi"} <= sources
    if corpus._tool_problem("festival") is None:
        assert "festival" in sources
    minutes = frame.groupby("split")["seconds"].sum() / 60
    assert minutes["train"] > 3 and minutes["test"] > 2 and minutes["valid"] > 0.3
    assert frame["seconds"].max() < 15


# -------------------------------------------------------------------------------------- the dataset


def test_training_crops_have_the_length_and_are_reproducible(built: Path):
    data = AudioDataset(built, "train", segment_seconds=0.5, seed=3)
    crop = data[0]
    assert crop.shape == (1, 12_000) and crop.dtype == torch.float32
    assert len(data) == (load_manifest(built)["split"] == "train").sum()
    again = AudioDataset(built, "train", segment_seconds=0.5, seed=3)
    assert all(torch.equal(data[i], again[i]) for i in range(len(data)))
    long = max(range(len(data)), key=lambda i: data.frames[i])  # a segment with room to move the crop
    data.set_epoch(1)
    assert not torch.equal(data[long], again[long])
    again.set_epoch(1)
    assert torch.equal(data[long], again[long])
    assert not torch.equal(AudioDataset(built, "train", segment_seconds=0.5, seed=4)[long], again[long])


def test_evaluation_windows_are_fixed(built: Path):
    data = AudioDataset(built, "valid")
    assert not data.train and len(data) >= 1
    frames = [round(s * 24_000) for s in load_manifest(built).query("split == 'valid'")["seconds"]]
    assert len(data) == sum(max(n // 24_000, 1) for n in frames)
    data.set_epoch(5)
    assert all(torch.equal(data[i], AudioDataset(built, "valid")[i]) for i in range(len(data)))
    assert data[0].shape == (1, 24_000)


def test_dataset_split_errors(built: Path, tmp_path: Path):
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        AudioDataset(built, "dev")
    only_train = tmp_path / "manifest.csv"
    frame = load_manifest(built)
    frame[frame["split"] == "train"].to_csv(only_train, index=False)
    with pytest.raises(ValueError, match="split 'test' is empty"):
        AudioDataset(only_train, "test")
    with pytest.raises(ValueError, match="not the requested 16000 Hz"):
        AudioDataset(built, "train", sample_rate=16_000)
