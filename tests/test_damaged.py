"""Issue 36: every file a run or notebook reads is checked where it is read. A damaged or wrong-shape record,
table, evaluation or milestone checkpoint is named in one line and repaired (moved aside, made again), never
counted complete; an empty table keeps its header."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from studylib.analysis import horizon, stats
from studylib.core.storage import DamagedFile, write_json, write_parquet
from studylib.study.cells import run_problems
from studylib.training import evaluate as evaluation
from studylib.training.run_folder import RunFolder, read_manifest


@pytest.fixture
def run_folder(tmp_path):
    """A run folder whose records and tables read (no checkpoint: they stay out of git)."""
    folder = tmp_path / "runs" / "none-0123456789-s0"
    folder.mkdir(parents=True)
    for name in (RunFolder.CELL, RunFolder.MANIFEST, RunFolder.SUMMARY, RunFolder.EVAL_JSON, "eval_test_step10.json"):
        write_json({"status": "complete"}, folder / name)
    for name in (*RunFolder.TABLES, "eval_test_frequency.parquet", "eval_summary.parquet", "eval_test_step10.parquet",
                 "eval_test_step10_levels.parquet", "eval_test_step10_frequency.parquet"):
        write_parquet(pd.DataFrame({"bandwidth": [1.5], "x": [1.0]}), folder / name)
    return folder


def truncate(path):
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)])


@pytest.mark.parametrize("name", ["eval_test_levels.parquet", "summary.json", "eval_test_step10.parquet",
                                  "eval_test.json", "eval_test_frequency.parquet", "eval_summary.parquet"])
def test_a_truncated_file_of_a_run_is_a_problem_naming_it(run_folder, name):
    assert run_problems(run_folder) == {}
    truncate(run_folder / name)
    problems = run_problems(run_folder)
    assert list(problems) == [name] and str(run_folder / name) in problems[name]


def test_a_zero_byte_milestone_checkpoint_and_a_list_for_a_record_are_problems(run_folder):
    (run_folder / "checkpoint_step10.pt").write_bytes(b"")
    (run_folder / RunFolder.EVAL_JSON).write_text("[1]")
    problems = run_problems(run_folder)
    assert set(problems) == {"checkpoint_step10.pt", RunFolder.EVAL_JSON}
    assert "holds a list, not a record" in problems[RunFolder.EVAL_JSON]


def test_a_manifest_of_the_wrong_shape_is_damaged_not_a_traceback(run_folder):
    (run_folder / RunFolder.MANIFEST).write_text("[1]")
    with pytest.raises(DamagedFile, match="holds a list, not a run manifest"):
        read_manifest(run_folder)


def test_a_damaged_evaluation_is_moved_aside_and_made_again_not_read(run_folder, capsys):
    """03 used to skip evaluation because eval_test.parquet was newer than the checkpoint, then read a levels file
    the runner had moved aside: now the evaluation counts as current only when every file of it reads."""
    assert evaluation.evaluation_current(run_folder, run_folder / RunFolder.CHECKPOINT)
    truncate(run_folder / RunFolder.EVAL_LEVELS)
    assert not evaluation.evaluation_current(run_folder, run_folder / RunFolder.CHECKPOINT)
    assert not (run_folder / RunFolder.EVAL_LEVELS).exists()
    assert (run_folder / f"{RunFolder.EVAL_LEVELS}.damaged").is_file()
    assert "eval_test_levels.parquet" in capsys.readouterr().err
    (run_folder / RunFolder.EVAL_LEVELS).unlink(missing_ok=True)
    assert not evaluation.evaluation_current(run_folder, run_folder / RunFolder.CHECKPOINT)  # missing: not current


def test_an_empty_table_keeps_its_header(tmp_path):
    gains = horizon.gains(pd.DataFrame(columns=["arm", "seed", "step", "si_sdr"]))
    gains.to_csv(tmp_path / "gains.csv", index=False)
    assert list(pd.read_csv(tmp_path / "gains.csv").columns) == ["arm", "to_step", "metric", "si_sdr_db_gain", "ci95",
                                                                "n_seeds"]
    assert list(stats.seed_summary(pd.DataFrame(columns=["arm", "seed", "x"]), ["arm"], ["x"]).columns) == [
        "arm", "metric", "mean", "ci95", "n_seeds"]
    json.dumps(gains.to_dict())  # nothing odd in an empty frame


def test_a_run_folder_the_runner_holds_refuses_another_writer_but_not_the_runners_own_children(tmp_path,
                                                                                            synthetic_manifest):
    """Issue 36: the runner keeps a codec run's folder locked from training to the end of its evaluation; a
    `studylib train` elsewhere is refused, the notebook it started (its token in the environment) goes on under it."""
    from conftest import SMOKE, one_line, train_cli

    from studylib.core import locks, processes

    folder = tmp_path / "runs" / "none-0123456789-s0"
    with locks.hold_lock(folder, "studylib study", mark=False) as lock:
        before = lock.read_text()
        proc = train_cli(SMOKE, sets=[f"manifest={synthetic_manifest}", f"run_dir={folder}"])
        one_line(proc, 2, "train", f"{folder} is in use by PID")
        assert not (folder / RunFolder.MANIFEST).exists()  # the refused writer wrote nothing
        child = ("from studylib.core import locks\n"
                 f"with locks.hold_lock({str(folder)!r}, 'studylib train') as inner:\n"
                 "    print(inner.read_text())\n")
        env = {**os.environ, processes.ENV: locks.token_of(lock)}  # the runner's own child carries its token
        done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0 and done.stdout.strip() == before, done.stderr[-2000:]
        assert lock.read_text() == before  # left to its holder
        with pytest.raises(locks.LockedError):  # this process is the holder: a second hold here is refused
            with locks.hold_lock(folder, "studylib train"):
                pass
    assert not lock.exists()


def test_a_manifest_with_negative_seconds_is_one_line(tmp_path):
    from studylib.training.manifest import COLUMNS, ManifestError, load_manifest

    rows = [["a.flac", "train", "speech", "g", "s", "MIT", "10.0"], ["b.flac", "test", "speech", "h", "s", "MIT", "-3"]]
    (tmp_path / "manifest.csv").write_text("\n".join([",".join(COLUMNS), *(",".join(r) for r in rows)]) + "\n")
    with pytest.raises(ManifestError, match=r"b\.flac has seconds -3\.0, allowed a number > 0 \(1 such row"):
        load_manifest(tmp_path / "manifest.csv")


@pytest.mark.parametrize("content", [[1], {"step": 3}, b"truncated"])
def test_a_quantizer_cell_state_of_the_wrong_shape_is_moved_aside_and_the_cell_starts_again(tmp_path, capsys, content):
    """Issue 36: an 08 (or 02) cell's state file holding a list, missing keys or cut short: one warning naming it,
    moved aside, and the cell trains from its start (no AttributeError)."""
    import torch

    from studylib.training.latents import _saved_state

    state = tmp_path / "cell.state.pt"
    if isinstance(content, bytes):
        state.write_bytes(content)
    else:
        torch.save(content, state)
    assert _saved_state(state) is None
    assert not state.exists() and (tmp_path / "cell.state.pt.damaged").is_file()
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"warning: {state}") and line.endswith("moved aside to cell.state.pt.damaged, this cell "
                                                                   "starts again")
