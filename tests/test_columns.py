"""One column vocabulary: the study tables (summary.csv, regimes.csv, the analysis notebooks' tables) name each
quantity one way (`studylib.training.columns`), and the committed ones do."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from studylib.training.columns import study_name, study_names

ROOT = Path(__file__).parents[1]


def test_a_run_folders_names_map_to_the_study_tables_with_their_decorations():
    assert [study_name(c) for c in ("si_sdr", "visqol_audio", "bandwidth", "kbps", "nominal_kbps")] == \
        ["si_sdr_db", "visqol", "bandwidth_kbps", "bandwidth_kbps", "bandwidth_kbps"]
    assert [study_name(c) for c in ("test_si_sdr", "valid_si_sdr", "si_sdr_ci95", "d_visqol_audio_ci95",
                                    "full_band_si_sdr")] == \
        ["test_si_sdr_db", "valid_si_sdr_db", "si_sdr_db_ci95", "d_visqol_ci95", "full_band_si_sdr_db"]
    # names that merely contain one are left alone: entropy_kbps is not a bandwidth, visqol_speech is its own score
    for name in ("entropy_kbps", "payload_kbps", "si_sdr_db", "visqol_speech", "mel_distance", "si_sdr_6kbps"):
        assert study_name(name) == name


def test_study_names_keeps_values_and_refuses_two_columns_that_would_share_a_name():
    frame = pd.DataFrame({"bandwidth": [1.5, 6.0], "si_sdr": [1.0, 2.0], "item": ["a", "b"]})
    renamed = study_names(frame)
    assert list(renamed.columns) == ["bandwidth_kbps", "si_sdr_db", "item"]
    assert renamed.to_numpy().tolist() == frame.to_numpy().tolist()
    with pytest.raises(ValueError, match=r"\['bandwidth', 'nominal_kbps'\] would all be named \['bandwidth_kbps'\]"):
        study_names(frame.assign(nominal_kbps=[1.5, 6.0]))


def committed_study_tables() -> list[Path]:
    """summary.csv, regimes.csv and every table an analysis notebook committed (not a run folder's own files,
    not the benchmarks' records)."""
    tables = [ROOT / "results" / "summary.csv", ROOT / "results" / "regimes.csv"]
    for scale in sorted(p for p in (ROOT / "results").iterdir() if p.is_dir()):
        for notebook in sorted(scale.glob("0[4-8]_*")):
            tables += sorted(notebook.glob("*.csv"))
    return tables


def test_committed_study_tables_use_the_study_vocabulary_only():
    tables = committed_study_tables()
    assert len(tables) > 10  # summary, regimes, 04, 06, 07, 08 at least
    # a column `study_name` would rename is a run folder's name left in a study table
    offenders = {str(t.relative_to(ROOT)): [c for c in pd.read_csv(t, nrows=0).columns if study_name(c) != c]
                 for t in tables}
    assert {t: cols for t, cols in offenders.items() if cols} == {}
