"""studylib.analysis.reports: figures drawn from the tidy tables the runs write."""

from __future__ import annotations

import matplotlib
import pandas as pd

from studylib.analysis import reports

matplotlib.use("Agg")


def test_plot_arms_training_draws_each_arm_in_three_panels():
    rows = [{"arm": arm, "seed": 0, "step": step, "split": split, "used_l0": 5.0, "dead_now_l0": 3.0,
             "dead_now_l1": 1.0, "loss": 1.0 / step}
            for arm in ("none", "upstream") for step in (1, 2) for split in ("train", "valid")]
    fig = reports.plot_arms_training(pd.DataFrame(rows), ["upstream", "none"])
    axes = fig.axes
    assert len(axes) == 3 and all(len(ax.lines) == 2 for ax in axes)
    assert list(axes[1].lines[0].get_ydata()) == [2.0, 2.0]  # dead codes: mean over levels
