"""Shared fixtures: a small synthetic corpus built through the real corpus builder (audio-dir mode), a tiny
finished run, and the helpers that run the CLI as a user would (exit code, the one-line message, the files)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from studylib.core import locks
from studylib.study.corpus import build_corpus

ROOT = Path(__file__).parents[1]
SMOKE = ROOT / "params" / "scales" / "smoke.yaml"

# A test suite started in the background by a non-interactive shell (`make test &`, nohup, some CI runners) inherits
# SIGINT ignored, and an ignored signal stays ignored across exec: the commands the Ctrl-C tests start would then
# never see it (caught on 2026-12-07: `(make test &)` failed the two SIGINT tests, the run finishing unstopped).
# A handler of our own is reset to the default at exec, so the children start as from a terminal.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _cpu_numerics():
    torch.set_flush_denormal(True)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (the quantizer tests' timings and bit patterns assume it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def torchrun_two_ranks(worker: Path, out_dir: Path, arms: tuple[str, ...], timeout: int = 300) -> dict[str, list]:
    """Run `worker OUT_DIR` as 2 ranks under torch.distributed.run (gloo; see tests/rank_worker.py); fail with
    its output's tail if it fails. Returns {arm: [rank 0's result, rank 1's]}."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore::FutureWarning"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(worker), str(out_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {arm: [torch.load(out_dir / f"{arm}_rank{r}.pt") for r in (0, 1)] for arm in arms}


@pytest.fixture(scope="session")
def synthetic_manifest(tmp_path_factory) -> Path:
    """6 "speakers" x 2 files of 3 s: harmonic tones with vibrato and a little noise, 24 kHz."""
    src = tmp_path_factory.mktemp("audio")
    rng = np.random.default_rng(0)
    sr = 24_000
    t = np.arange(3 * sr) / sr
    for speaker in range(6):
        (src / f"spk{speaker}").mkdir()
        for take in range(2):
            f0 = 110 * (1 + speaker) * (1 + 0.02 * np.sin(2 * np.pi * (3 + take) * t))
            phase = 2 * np.pi * np.cumsum(f0) / sr
            wav = sum(np.sin(k * phase) / k for k in range(1, 6)) * 0.2 + 0.01 * rng.standard_normal(t.size)
            sf.write(src / f"spk{speaker}" / f"take{take}.wav", wav.astype(np.float32), sr)
    return build_corpus("synthetic", tmp_path_factory.mktemp("data"), audio_dir=src, jobs=1)


def smoke_config(manifest: Path, run_dir: Path, **overrides):
    """TrainConfig from params/scales/smoke.yaml with a manifest, run folder and overrides."""
    from studylib.core import config as cfglib
    from studylib.training.run_config import TrainConfig

    sets = {"manifest": str(manifest), "run_dir": str(run_dir), "progress": False} | overrides
    return cfglib.build(TrainConfig, [cfglib.read_overlay(SMOKE), sets])


SMOKE_RUN = {"expiry_mode": "fixed", "expiry_threshold": 1.0}


@pytest.fixture(scope="session")
def smoke_run(synthetic_manifest, tmp_path_factory) -> Path:
    """A finished smoke-scale codec run (fixed expiry) on the synthetic corpus."""
    from studylib.training.train import train

    run_dir = tmp_path_factory.mktemp("runs") / "smoke"
    assert train(smoke_config(synthetic_manifest, run_dir, **SMOKE_RUN)).status == "complete"
    return run_dir


@pytest.fixture(scope="session")
def ci_data(tmp_path_factory) -> Path:
    """A data folder holding the real `ci` corpus (Debian packages; built once per session)."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("apt-get/dpkg-deb not available: the ci profile is built from Debian packages")
    data = tmp_path_factory.mktemp("ci_data")
    build_corpus("ci", data, jobs=os.cpu_count())
    return data


def train_killed_then_resumed(cfg, kill_at_step: int, monkeypatch) -> Path:
    """Train `cfg` until step `kill_at_step` (0-based) raises KeyboardInterrupt, check the run is recorded as
    interrupted (resumable, not failed), then train it again from its last checkpoint; returns the run folder of the
    completed run."""
    from studylib.training import train as trainlib

    real_batch = trainlib._train_batch

    def killed(dataset, cfg_, step, rank):
        if step == kill_at_step:
            raise KeyboardInterrupt("simulated kill")
        return real_batch(dataset, cfg_, step, rank)

    monkeypatch.setattr(trainlib, "_train_batch", killed)
    with pytest.raises(KeyboardInterrupt):
        trainlib.train(cfg)
    manifest = json.loads((Path(cfg.run_dir) / "manifest.json").read_text())
    assert manifest["status"] == "interrupted" and manifest["error"].startswith(
        f"interrupted by SIGINT at step {kill_at_step + 1} of {cfg.steps}; the same command resumes it")
    monkeypatch.setattr(trainlib, "_train_batch", real_batch)
    assert trainlib.train(cfg).status == "complete"
    return Path(cfg.run_dir)


# ------------------------------------------------------------------- the CLI as a user runs it


ARMS = ROOT / "params" / "arms"
TINY = ["progress=false", "steps=2", "log_every=1", "valid_every=2", "checkpoint_every=2", "valid_items=2"]


def studylib(*args, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "studylib", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


def train_cli(*params, sets: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return studylib("train", *params, *sum((["--set", s] for s in sets), []), cwd=cwd)


def one_line(proc: subprocess.CompletedProcess, code: int, command: str, *fragments: str) -> str:
    """The single stderr line, after checking the exit code and that it names what it should."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == code, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"studylib {command}: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def tree(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder below `folder` with its size and mtime: equal snapshots = nothing written."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


@contextlib.contextmanager
def read_only(folder: Path):
    """`folder`, unwritable even for root (who ignores permissions: the folder is made immutable instead)."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o555)
    immutable = False
    try:
        probe = folder / "probe"
        try:
            probe.touch()
        except OSError:
            pass
        else:
            probe.unlink()
            if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)],
                                                                 capture_output=True).returncode:
                pytest.skip("running as root without chattr +i: cannot make a read-only folder")
            immutable = True
        yield folder
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)


@pytest.fixture(scope="module")
def fixed_rel_run(synthetic_manifest, tmp_path_factory) -> Path:
    """A finished two-step tiny run of the fixed_rel arm, trained through the CLI."""
    run_dir = tmp_path_factory.mktemp("bad_input") / "fixed_rel"
    proc = train_cli(SMOKE, ARMS / "fixed_rel.yaml", sets=[f"manifest={synthetic_manifest}", f"run_dir={run_dir}",
                                                          *TINY])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (run_dir / locks.LOCK_NAME).exists(), "the lock is removed when the run ends"
    return run_dir
