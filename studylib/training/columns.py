"""The study's column vocabulary: one name per quantity in every study table.

summary.csv, regimes.csv and the tables the analysis notebooks (04-08) write name a quantity one way:
`si_sdr_db`, `visqol`, `bandwidth_kbps` (and `mel_distance`, `usage`, `perplexity_l0`, `entropy_kbps`, which
never had a second name). A run folder's own files (eval_test*.parquet, metrics.parquet, 03's report) are the
per-window record an evaluation writes and keep its names (`si_sdr`, `visqol_audio`, `bandwidth`); `study_names`
renames them where they become a study table, so the two vocabularies meet in this one place.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

# a run folder's name -> the study tables' name
STUDY_NAMES = {"si_sdr": "si_sdr_db", "visqol_audio": "visqol", "bandwidth": "bandwidth_kbps",
               "kbps": "bandwidth_kbps", "nominal_kbps": "bandwidth_kbps"}
# the decorations a study table puts around a quantity's name: a split, a paired difference, a 95 % interval
_PREFIXES = ("", "valid_", "test_", "d_", "full_band_")
_SUFFIXES = ("", "_ci95")


def study_name(column: str) -> str:
    """`column`'s name in a study table: `si_sdr` -> `si_sdr_db`, `test_si_sdr` -> `test_si_sdr_db`,
    `visqol_audio_ci95` -> `visqol_ci95`; any other name unchanged."""
    for old, new in STUDY_NAMES.items():
        for prefix in _PREFIXES:
            for suffix in _SUFFIXES:
                if column == f"{prefix}{old}{suffix}":
                    return f"{prefix}{new}{suffix}"
    return column


def study_names(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` with its columns in the study's vocabulary (`study_name`); values untouched. Two columns that
    would get one name (e.g. `bandwidth` and `nominal_kbps`) are an error, not a silent overwrite."""
    renamed = [study_name(c) for c in frame.columns]
    clash = sorted({n for n in renamed if renamed.count(n) > 1})
    if clash:
        raise ValueError(f"columns {sorted(c for c in frame.columns if study_name(c) in clash)} would all be named "
                         f"{clash} in a study table: drop all but one first")
    return frame.rename(columns=dict(zip(frame.columns, renamed)))
