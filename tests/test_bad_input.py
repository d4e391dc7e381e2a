"""Bad input never crashes a build or passes silently (issue 10): every case runs through the CLI as a
subprocess, as a user would, and we assert the exit code, the one-line message and that nothing else was
written.

User errors: exit 2, one line `studylib <command>: <message>` naming the file, folder or key, nothing written.
Failed runs (divergence, NaN in the data found while training): exit 1, one line, status failed."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
import yaml
from conftest import ARMS, ROOT, SMOKE, TINY, one_line, read_only, studylib, train_cli, tree

from studylib.core import locks
from studylib.training.manifest import SPLITS, load_manifest


def _copy_run(run: Path, to: Path, *names: str) -> Path:
    to.mkdir(parents=True)
    for name in names:
        shutil.copy2(run / name, to / name)
    return to


# ------------------------------------------------------------------------------- 1. corpus files


def _tones(root: Path, speakers: int = 6) -> None:
    rate = 16_000
    t = np.arange(2 * rate) / rate
    for speaker in range(speakers):
        (root / f"spk{speaker}").mkdir(parents=True)
        sf.write(root / f"spk{speaker}" / "take.wav", (0.3 * np.sin(2 * np.pi * 150 * (1 + speaker) * t)), rate)


def _bad_files(root: Path) -> dict[str, str]:
    """Bad files among the speakers' good ones: name -> the reason the build must give."""
    rate = 16_000
    noise = (0.1 * np.random.default_rng(0).standard_normal(rate)).astype(np.float32)
    noise[[100, 900]] = [np.nan, np.inf]
    sf.write(root / "spk0" / "nan.wav", noise, rate, subtype="FLOAT")
    sf.write(root / "spk1" / "silence.wav", np.zeros(rate, np.float32), rate)
    sf.write(root / "spk2" / "one_sample.wav", np.array([0.5], np.float32), rate)
    (root / "spk3" / "broken.wav").write_bytes(b"RIFF this is not a wave file")
    return {"nan.wav": "holds NaN or Inf samples", "silence.wav": "silent", "one_sample.wav": "too short",
            "broken.wav": "undecodable"}


def test_corpus_skips_each_bad_file_with_one_warning_and_writes_a_valid_manifest(tmp_path):
    audio = tmp_path / "audio"
    _tones(audio)
    reasons = _bad_files(audio)
    proc = studylib("corpus", "--audio-dir", audio, "--out", tmp_path / "data", "--jobs", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == len(reasons), warnings
    for name, reason in reasons.items():
        (line,) = [w for w in warnings if name in w]
        assert re.fullmatch(rf"warning: skipped {re.escape(str(audio))}/spk\d/{re.escape(name)}: {reason}.*", line), \
            line
    manifest = load_manifest(tmp_path / "data" / "custom" / "manifest.csv", check_files=True)
    assert set(manifest.split) == set(SPLITS) and len(manifest) == 6  # one segment per good take


def _write_bad(path: Path, kind: str) -> str:
    """One bad file of `kind` at `path`; returns the reason the build must give for it."""
    rate = 16_000
    if kind == "undecodable":
        path.write_bytes(b"RIFF this is not a wave file")
        return "undecodable"
    if kind == "zero_bytes":
        path.write_bytes(b"")
        return "undecodable"
    if kind == "empty":  # a valid WAV header and no samples
        sf.write(path, np.zeros(0, np.float32), rate)
        return "empty (no samples)"
    if kind == "nan":
        noise = (0.1 * np.random.default_rng(0).standard_normal(rate)).astype(np.float32)
        noise[[100, 900]] = [np.nan, np.inf]
        sf.write(path, noise, rate, subtype="FLOAT")
        return "holds NaN or Inf samples"
    assert kind == "too_short"
    sf.write(path, 0.3 * np.sin(np.arange(400) / 5).astype(np.float32), rate)
    return "too short"


@pytest.mark.parametrize("kind", ["undecodable", "zero_bytes", "empty", "nan", "too_short"])
def test_one_bad_loose_file_among_twelve_good_ones_is_skipped_and_the_manifest_is_named(tmp_path, kind):
    """The issue-27 shape: loose files (each its own group), one bad. The bad file's group yields nothing, so the
    splits are drawn again among the groups that did: the manifest is written whatever split the bad one had."""
    audio = tmp_path / "audio"
    audio.mkdir()
    rate = 16_000
    t = np.arange(2 * rate) / rate
    for n in range(12):
        sf.write(audio / f"take{n:02d}.wav", 0.3 * np.sin(2 * np.pi * 120 * (1 + n) * t), rate)
    bad = audio / f"bad_{kind}.wav"
    reason = _write_bad(bad, kind)
    proc = studylib("corpus", "--audio-dir", audio, "--out", tmp_path / "data", "--jobs", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: skipped {bad}: {reason}"), warnings
    manifest_path = tmp_path / "data" / "custom" / "manifest.csv"
    manifest = load_manifest(manifest_path, check_files=True)
    assert set(manifest.split) == set(SPLITS) and len(manifest) == 12 and "bad" not in " ".join(manifest.group)
    assert proc.stdout.strip().splitlines()[-1] == f"wrote {manifest_path}: 12 files in, 1 skipped (12 segments)"


def test_corpus_with_nothing_usable_is_one_line_error_and_writes_nothing(tmp_path):
    audio = tmp_path / "audio"
    for speaker in range(3):
        (audio / f"spk{speaker}").mkdir(parents=True)
        sf.write(audio / f"spk{speaker}" / "silence.wav", np.zeros(8000, np.float32), 16_000)
    proc = studylib("corpus", "--audio-dir", audio, "--out", tmp_path / "data", "--jobs", "1")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("studylib corpus:")]
    assert proc.returncode == 2 and len(errors) == 1
    assert errors[0] == "studylib corpus: error: no usable audio: all 3 input files were skipped (see the " \
                        "warnings above)"
    assert sum(line.startswith("warning: skipped") for line in proc.stderr.splitlines()) == 3
    assert not (tmp_path / "data").exists()


# ------------------------------------------------------------------------------- 2. a mistyped --manifest


def test_study_with_a_mistyped_manifest_says_so_and_builds_nothing(tmp_path):
    typo = tmp_path / "data" / "my-corpus" / "manifst.csv"
    proc = studylib("study", "--scale", "smoke", "--manifest", typo, "--data", tmp_path / "elsewhere",
                    "--results", tmp_path / "results")
    one_line(proc, 2, "study", f"{typo}: no such manifest")
    assert "building" not in proc.stdout
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path / "results").exists()


# ------------------------------------------------------------------------------- 3. another config's checkpoint


def test_checkpoint_of_another_config_is_refused_naming_both_hashes(fixed_rel_run, synthetic_manifest, tmp_path):
    run_dir = _copy_run(fixed_rel_run, tmp_path / "upstream", "checkpoint.pt")  # no manifest.json beside it
    before = tree(run_dir)
    proc = train_cli(SMOKE, ARMS / "upstream.yaml", sets=[f"manifest={synthetic_manifest}", f"run_dir={run_dir}",
                                                         *TINY])
    line = one_line(proc, 2, "train", f"run_dir: {run_dir} holds a run of another config")
    stored = json.loads((fixed_rel_run / "manifest.json").read_text())["config_hash"]
    hashes = re.search(r"checkpoint\.pt: ([0-9a-f]{10}), this run: ([0-9a-f]{10})", line)
    assert hashes and hashes[1] == stored and hashes[2] != stored
    assert tree(run_dir) == before


def test_audit_checks_the_weights_against_their_stored_config(fixed_rel_run, tmp_path):
    ckpt = torch.load(fixed_rel_run / "checkpoint.pt", weights_only=True)
    ckpt["config"]["model"] = "small"  # tiny weights labelled small
    path = tmp_path / "relabelled.pt"
    torch.save(ckpt, path)
    before = tree(tmp_path)
    proc = studylib("audit", path)
    one_line(proc, 2, "audit", f"{path}: the weights do not fit the stored config (model small",
             "of another shape", "e.g. ")
    assert "small" not in proc.stdout and tree(tmp_path) == before


# ------------------------------------------------------------------------------- 4. NaN in the valid split


def _corpus_copy(manifest: Path, to: Path) -> tuple[Path, pd.DataFrame]:
    shutil.copytree(manifest.parent, to)
    return to / "manifest.csv", load_manifest(to / "manifest.csv")


def test_nan_in_the_valid_split_fails_the_run_naming_the_file(synthetic_manifest, tmp_path):
    manifest, frame = _corpus_copy(synthetic_manifest, tmp_path / "corpus")
    row = frame.index[frame.split == "valid"][0]
    audio, rate = sf.read(manifest.parent / frame.path[row], dtype="float32")
    audio[100:200] = np.nan
    sf.write(manifest.parent / "nan.wav", audio, rate, subtype="FLOAT")
    frame.loc[row, "path"] = "nan.wav"
    frame.to_csv(manifest, index=False)
    run_dir = tmp_path / "run"
    proc = train_cli(SMOKE, sets=[f"manifest={manifest}", f"run_dir={run_dir}", *TINY])
    line = one_line(proc, 1, "train", "step 2: ", f"{manifest.parent / 'nan.wav'}: holds NaN or Inf samples")
    record = json.loads((run_dir / "manifest.json").read_text())
    assert record["status"] == "failed" and record["error"] == line.removeprefix("studylib train: ")


def test_a_nan_validation_loss_fails_the_run_like_a_training_loss(synthetic_manifest, tmp_path, monkeypatch):
    """Clean data, a model that is NaN on held-out audio: the run fails, it is not `complete`."""
    from conftest import smoke_config

    from studylib.training import train as trainlib

    real = trainlib.validate
    monkeypatch.setattr(trainlib, "validate", lambda *a, **k: real(*a, **k) | {"loss": float("nan")})
    run = trainlib.train(smoke_config(synthetic_manifest, tmp_path / "run", steps=2, log_every=1, valid_every=2,
                                      checkpoint_every=2, valid_items=2))
    record = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert run.status == "failed" and record["status"] == "failed"
    assert record["error"] == "diverged at step 2: the validation loss is nan"


# ------------------------------------------------------------------------------- 5. divergence and lr


@pytest.mark.parametrize("lr, message", [(".inf", "lr: got inf, allowed a finite number > 0"),
                                         (".nan", "lr: got nan, allowed a finite number > 0"),
                                         ("0.0", "lr: got 0.0, allowed a value > 0"),
                                         ("-1.0e-3", "lr: got -0.001, allowed a value > 0")])
def test_lr_must_be_finite_and_positive(lr, message, tmp_path):
    proc = train_cli(SMOKE, sets=[f"run_dir={tmp_path / 'run'}", f"lr={lr}"])
    assert one_line(proc, 2, "train") == f"studylib train: {message}"
    assert not (tmp_path / "run").exists()


def test_a_diverging_run_says_at_which_step_not_that_the_data_is_bad(synthetic_manifest, tmp_path):
    run_dir = tmp_path / "run"
    proc = train_cli(SMOKE, sets=[f"manifest={synthetic_manifest}", f"run_dir={run_dir}", "lr=1.0e+30", *TINY,
                                  "steps=4"])
    line = one_line(proc, 1, "train", "diverged at step ")
    assert "batch" not in line and "data" not in line
    step = int(re.search(r"diverged at step (\d+)", line)[1])
    assert 1 <= step <= 4
    record = json.loads((run_dir / "manifest.json").read_text())
    assert record["status"] == "failed" and record["error"] == line.removeprefix("studylib train: ")


# ------------------------------------------------------------------------------- 6. one-line errors


def test_broken_yaml_in_a_params_file(tmp_path):
    params = tmp_path / "mine.yaml"
    params.write_text("model: tiny\nbandwidths: [1.5, 3.0\nsteps: 4\n")
    proc = train_cli(SMOKE, params, sets=[f"run_dir={tmp_path / 'run'}"])
    one_line(proc, 2, "train", f"{params}: not valid YAML (", "line 3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.yaml"]


def test_missing_default_manifest_leaves_no_run_folder(tmp_path):
    proc = train_cli(SMOKE, sets=["run_dir=runs/mine"], cwd=tmp_path)  # the default manifest: data/ci/manifest.csv
    one_line(proc, 2, "train", "data/ci/manifest.csv: no such manifest; build one with `studylib corpus")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", ["folder", "columns", "missing files", "not csv"])
def test_bad_manifests_are_one_line_errors_before_the_run_folder_exists(case, synthetic_manifest, tmp_path):
    if case == "folder":
        manifest, message = synthetic_manifest.parent, "is a folder; give the manifest.csv file"
    elif case == "columns":
        manifest, message = tmp_path / "wrong.csv", "columns ['file', 'split'], expected ['path', 'split'"
        manifest.write_text("file,split\na.flac,train\n")
    elif case == "missing files":
        manifest, frame = _corpus_copy(synthetic_manifest, tmp_path / "corpus")
        gone = manifest.parent / frame.path.iloc[-1]
        gone.unlink()
        message = f"1 of the {len(frame)} audio files it lists are missing (e.g. {gone})"
    else:
        manifest, message = tmp_path / "binary.csv", "not a readable manifest CSV"
        manifest.write_bytes(bytes(range(256)) * 4)
    run_dir = tmp_path / "run"
    proc = train_cli(SMOKE, sets=[f"manifest={manifest}", f"run_dir={run_dir}"])
    one_line(proc, 2, "train", f"{manifest}: ", message)
    assert not run_dir.exists()


def test_reusing_a_run_folder_of_another_config(fixed_rel_run, synthetic_manifest, tmp_path):
    run_dir = _copy_run(fixed_rel_run, tmp_path / "run", "checkpoint.pt", "manifest.json", "metrics.parquet")
    before = tree(run_dir)
    proc = train_cli(SMOKE, ARMS / "fixed_rel.yaml", sets=[f"manifest={synthetic_manifest}", f"run_dir={run_dir}",
                                                          *TINY, "seed=1"])
    one_line(proc, 2, "train", f"run_dir: {run_dir} holds a run of another config", "choose another run_dir")
    assert tree(run_dir) == before


@pytest.mark.parametrize("content", [b"", b"not a checkpoint\n", "truncated"])
def test_a_corrupt_checkpoint_on_resume(content, fixed_rel_run, synthetic_manifest, tmp_path):
    run_dir = _copy_run(fixed_rel_run, tmp_path / "run", "manifest.json", "metrics.parquet")
    ckpt = run_dir / "checkpoint.pt"
    ckpt.write_bytes((fixed_rel_run / "checkpoint.pt").read_bytes()[:2000] if content == "truncated" else content)
    before = tree(run_dir)
    proc = train_cli(SMOKE, ARMS / "fixed_rel.yaml", sets=[f"manifest={synthetic_manifest}", f"run_dir={run_dir}",
                                                          *TINY])
    one_line(proc, 2, "train", f"{ckpt}: not a readable checkpoint (", "delete it to start the run over")
    assert tree(run_dir) == before


def test_a_read_only_results_folder(synthetic_manifest, tmp_path):
    with read_only(tmp_path / "locked") as folder:
        proc = studylib("study", "--scale", "smoke", "--results", folder, "--manifest", synthetic_manifest,
                        "--only", "01_bug_anatomy")
        one_line(proc, 2, "study", f"{folder / 'smoke'}: cannot write there (")
        proc = train_cli(SMOKE, sets=[f"manifest={synthetic_manifest}", f"run_dir={folder / 'run'}", *TINY])
        one_line(proc, 2, "train", f"{folder / 'run'}: cannot write there (")
        assert list(folder.iterdir()) == []


@pytest.mark.parametrize("case", ["zero bytes", "text", "other weights"])
def test_evaluate_on_a_checkpoint_it_cannot_use(case, fixed_rel_run, tmp_path):
    path = tmp_path / "checkpoint.pt"
    if case == "zero bytes":
        path.write_bytes(b"")
        message = "not a readable checkpoint (EOFError"
    elif case == "text":
        path.write_text("these are not weights\n")
        message = "not a readable checkpoint ("
    else:
        ckpt = torch.load(fixed_rel_run / "checkpoint.pt", weights_only=True)
        ckpt["config"]["n_filters"] = 16  # the weights are the tiny preset's (n_filters 4)
        torch.save(ckpt, path)
        message = "the weights do not fit the stored config (model tiny"
    before = tree(tmp_path)
    proc = studylib("evaluate", tmp_path, "--visqol-items", "0")
    one_line(proc, 2, "evaluate", f"{path}: {message}")
    assert tree(tmp_path) == before


# ------------------------------------------------------------------------------- 7. nothing to compare


def _small_anatomy_params(tmp_path: Path) -> Path:
    """params/ with the smoke scale reduced to the bug anatomy (tiny) and the comparison."""
    params = tmp_path / "params"
    shutil.copytree(ROOT / "params", params)
    study = yaml.safe_load((params / "study.yaml").read_text())
    study["scales"]["smoke"] |= {"notebooks": ["01_bug_anatomy", "04_compare"], "anatomy": {
        "steps": 2, "frames": 64, "codebook_size": 64, "dim": 8, "large_frames": 256, "shrink_frames": 128,
        "shrink_codebook_size": 16}}
    (params / "study.yaml").write_text(yaml.safe_dump(study))
    return params


@pytest.mark.slow
def test_only_one_notebook_on_an_empty_results_folder_does_not_fail_the_study(synthetic_manifest, tmp_path):
    results = tmp_path / "results"
    proc = studylib("study", "--scale", "smoke", "--params", _small_anatomy_params(tmp_path), "--results", results,
                    "--manifest", synthetic_manifest, "--only", "01_bug_anatomy")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    compare = results / "smoke" / "04_compare"
    assert json.loads((compare / "cell.json").read_text())["status"] == "complete"
    summary = json.loads((compare / "summary.json").read_text())
    assert summary["runs"] == 0 and summary["note"].startswith("Nothing to compare yet: no evaluated codec run")
    assert "Nothing to compare yet" in (compare / "report.html").read_text()
    assert not (results / "smoke" / locks.LOCK_NAME).exists()


# ------------------------------------------------------------------------------- 8. locks


@pytest.fixture
def live_pid():
    """A process that stays alive while the test runs."""
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]) as proc:
        yield proc.pid
        proc.kill()


def _lock(folder: Path, pid: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / locks.LOCK_NAME
    path.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "2026-01-01T00:00:00+00:00",
                                "command": "studylib study"}))
    return path


def test_a_second_study_on_the_same_results_folder_is_refused(live_pid, synthetic_manifest, tmp_path):
    lock = _lock(tmp_path / "results" / "smoke", live_pid)
    before = tree(tmp_path / "results")
    proc = studylib("study", "--scale", "smoke", "--results", tmp_path / "results", "--manifest", synthetic_manifest,
                    "--only", "01_bug_anatomy")
    one_line(proc, 2, "study", f"{tmp_path / 'results' / 'smoke'} is in use by PID {live_pid} on ",
             f"delete {lock} if that process is gone")
    assert tree(tmp_path / "results") == before


def test_a_second_train_on_the_same_run_folder_is_refused(live_pid, synthetic_manifest, tmp_path):
    run_dir = tmp_path / "run"
    _lock(run_dir, live_pid)
    before = tree(run_dir)
    proc = train_cli(SMOKE, sets=[f"manifest={synthetic_manifest}", f"run_dir={run_dir}", *TINY])
    one_line(proc, 2, "train", f"{run_dir} is in use by PID {live_pid} on ")
    assert tree(run_dir) == before


def test_a_stale_lock_is_taken_over_with_a_message(synthetic_manifest, tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(gone.stdout)
    run_dir = tmp_path / "run"
    lock = _lock(run_dir, pid)
    proc = train_cli(SMOKE, sets=[f"manifest={synthetic_manifest}", f"run_dir={run_dir}", *TINY])
    one_line(proc, 0, "train", f"taking over the stale lock {lock} of PID {pid} (no longer running)")
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "complete"
    assert not lock.exists()


def test_lock_holds_pid_and_host_and_refuses_a_second_holder(tmp_path):
    with locks.hold_lock(tmp_path / "new", "studylib test") as path:
        owner = json.loads(path.read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname() and owner["started"]
        with pytest.raises(locks.LockedError, match=rf"is in use by PID {os.getpid()} on "):
            with locks.hold_lock(tmp_path / "new", "studylib test"):
                pass
        assert path.exists(), "a refused holder leaves the lock alone"
    assert not path.exists()
    path.write_text("{not json")  # a lock cut short by a crash is stale
    with locks.hold_lock(tmp_path / "new", "studylib test"):
        assert json.loads(path.read_text())["pid"] == os.getpid()


def test_a_bad_file_that_held_a_split_alone_does_not_leave_that_split_empty(tmp_path):
    from studylib.study.corpus import _hash_splits

    good = ["take0", "take1", "take2"]
    # a bad file's name that the hash split gives a split of its own among these four groups
    bad = next(name for name in (f"bad{n}" for n in range(1000))
               if list((splits := _hash_splits([*good, name], (0.8, 0.1, 0.1))).values()).count(splits[name]) == 1)
    audio = tmp_path / "audio"
    audio.mkdir()
    t = np.arange(2 * 16_000) / 16_000
    for n, name in enumerate(good):
        sf.write(audio / f"{name}.wav", 0.3 * np.sin(2 * np.pi * 150 * (1 + n) * t), 16_000)
    _write_bad(audio / f"{bad}.wav", "nan")
    proc = studylib("corpus", "--audio-dir", audio, "--out", tmp_path / "data", "--jobs", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = load_manifest(tmp_path / "data" / "custom" / "manifest.csv", check_files=True)
    assert sorted(manifest.split) == sorted(SPLITS), "three good groups: one per split"
