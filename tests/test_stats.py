"""studylib.analysis.stats: the one t-interval, mean ± CI over seeds and paired-by-seed difference of the study."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from studylib.analysis import stats


def test_t_ci95_is_scipys_interval_and_leaves_out_missing_values():
    values = [1.0, 2.5, 4.0, 3.0]
    low, high = scipy_stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=scipy_stats.sem(values))
    mean, half = stats.t_ci95([*values, None, math.nan])
    assert mean == pytest.approx(np.mean(values)) and half == pytest.approx((high - low) / 2)
    assert stats.t_ci95([2.0])[0] == 2.0 and math.isnan(stats.t_ci95([2.0])[1])
    assert all(math.isnan(x) for x in stats.t_ci95([]))


def test_paired_is_the_interval_of_the_per_seed_differences_over_shared_seeds():
    arm = pd.DataFrame({"si": [3.0, 5.0, 4.0, 9.0]}, index=pd.Index([0, 1, 2, 3], name="seed"))
    base = pd.DataFrame({"si": [1.0, 2.0, 2.5]}, index=pd.Index([0, 1, 2], name="seed"))
    gap = stats.paired(arm, base, "si")
    assert gap.n == 3  # seed 3 has no baseline
    assert (gap.diff, gap.ci95) == stats.t_ci95([2.0, 3.0, 1.5])
    ratio = stats.paired(arm, base, "si", keys=[0, 1], ratio=True)
    assert ratio.n == 2 and ratio.diff == pytest.approx((3.0 + 2.5) / 2)


def test_seed_summary_pools_within_a_seed_first():
    frame = pd.DataFrame({"arm": ["a"] * 4, "seed": [0, 0, 1, 1], "x": [1.0, 3.0, 4.0, 6.0]})
    row = stats.seed_summary(frame, ["arm"], ["x"]).iloc[0]
    assert row["mean"] == pytest.approx(3.5) and row.n_seeds == 2  # seeds' means 2 and 5
    assert row.ci95 == pytest.approx(stats.t_ci95([2.0, 5.0])[1])
