"""Issue 36: a command-line value out of range is one line naming the option and what is allowed, exit 2, before
anything is loaded or written (NaN, infinities and negative counts included)."""

from __future__ import annotations

import pytest
from conftest import one_line, studylib


@pytest.mark.parametrize("command, args, message", [
    ("evaluate", ["--seconds", "-1"], "--seconds: got -1.0, allowed a number > 0 and <= 60"),
    ("evaluate", ["--seconds", "inf"], "--seconds: got inf, allowed a number > 0 and <= 60"),
    ("evaluate", ["--seconds", "nan"], "--seconds: got nan, allowed a number > 0 and <= 60"),
    ("evaluate", ["--seconds", "1e9"], "--seconds: got 1000000000.0, allowed a number > 0 and <= 60"),
    ("evaluate", ["--visqol-items", "-1"], "--visqol-items: got -1, allowed an integer >= 0"),
    ("audit", ["--threshold", "-1"], "--threshold: got -1.0, allowed a number >= 0"),
    ("audit", ["--threshold", "nan"], "--threshold: got nan, allowed a number >= 0"),
    ("audit", ["--bandwidth", "nan"], "--bandwidth: got nan, allowed a number > 0"),
    ("audit", ["--frames-per-step", "0"], "--frames-per-step: got 0, allowed an integer >= 1"),
])
def test_an_option_out_of_range_is_one_line_naming_it(tmp_path, command, args, message):
    one_line(studylib(command, str(tmp_path / "run"), *args), 2, command, message)


def test_corpus_jobs_zero_is_one_line(tmp_path):
    proc = studylib("corpus", "--profile", "ci", "--out", str(tmp_path / "data"), "--jobs", "0")
    one_line(proc, 2, "corpus", "--jobs: got 0, allowed an integer >= 1")
    assert not (tmp_path / "data").exists()
