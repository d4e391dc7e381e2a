"""The claims of the reports (studylib.analysis.claims) on small hand-made tables."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from studylib.analysis import claims, stats


def _grid_rows(arm: str, seed: int, fps: int = 600, usage: float = 0.5, threshold: float = 2.0, every: int = 1,
               replaced: float = 0.0, cell: str | None = None) -> list[dict]:
    tag = {"cell": cell or f"{arm}-{threshold}-{every}-{fps}-s{seed}", "arm": arm, "seed": seed, "frames_per_step": fps,
           "variant": arm if arm != "fixed_rel" else f"fixed_rel th={threshold:g} every={every}",
           "expiry_mode": {"none": "none", "upstream": "upstream"}.get(arm, "fixed"),
           "expiry_threshold": threshold, "expiry_every": every}
    rows = []
    for step in (5, 10):
        rows.append({**tag, "step": step, "split": "train", "loss": 1.0 / step, "replaced_l0": replaced,
                     "replaced_l1": replaced, "dead_l0": 3.0, "dead_l1": 1.0, "replaced_total_l0": replaced * step,
                     "replaced_total_l1": replaced * step})
        rows.append({**tag, "step": step, "split": "eval", "usage_l0": usage, "usage_l1": usage / 2,
                     "snr_l0": 1.0, "snr_l1": 2.0 + seed})
    return rows


def test_upstream_is_identical_to_none_per_seed_and_frames_per_step_despite_its_counters():
    runs = pd.DataFrame(_grid_rows("none", 0) + _grid_rows("upstream", 0, replaced=7.0)
                        + _grid_rows("none", 1) + _grid_rows("upstream", 1, usage=0.6))
    same = claims.identical_quantizer_runs(runs)
    assert same.to_dict() == {(600, 0): True, (600, 1): False}
    assert claims.identical_quantizer_runs(runs[runs.arm == "none"]).empty


def test_identical_codec_runs_compares_training_and_test_scores():
    train = pd.DataFrame({"arm": ["none", "upstream"], "run": ["a", "b"], "seed": [0, 0], "step": [1, 1],
                          "loss": [0.5, 0.5], "seconds": [1.0, 2.0], "replaced_l0": [0, 9]})
    items = pd.DataFrame({"arm": ["none", "upstream"], "item": ["x", "x"], "bandwidth": [6.0, 6.0], "seed": [0, 0],
                          "si_sdr": [1.0, 1.0], "mel_distance": [2.0, 2.0]})
    assert claims.identical_codec_runs(train, items) is True
    assert claims.identical_codec_runs(train, items.assign(si_sdr=[1.0, 1.5])) is False
    assert claims.identical_codec_runs(train.assign(loss=[0.5, 0.4]), items) is False
    assert claims.identical_codec_runs(train[train.arm == "none"], items) is None


def _grid() -> pd.DataFrame:
    rows = []
    for seed in (0, 1):
        rows += _grid_rows("upstream", seed, usage=0.2)
        for threshold in (0.1, 0.3):
            for every in (1, 5):
                rows += _grid_rows("fixed_rel", seed, usage=threshold + every / 10, threshold=threshold, every=every,
                                   replaced=every)
    return pd.DataFrame(rows)


def test_quantizer_summary_keeps_the_settings_and_the_table_is_built_from_them():
    eval_rows, train_rows = claims.quantizer_rows(_grid())
    final = claims.quantizer_final(eval_rows, train_rows)
    assert len(final) == final.cell.nunique() == 10 and (final.step == 10).all()
    assert final.set_index("cell").loc["fixed_rel-0.1-5-600-s0", "replaced_per_100_steps"] == pytest.approx(1000.0)
    assert final.usage_mean.iloc[0] == pytest.approx(0.15)  # mean over levels of 0.2 and 0.1
    summary = claims.quantizer_summary(final)
    assert {"variant", "frames_per_step", "arm", "expiry_threshold", "expiry_every", "metric", "mean", "ci95",
            "n_seeds"} <= set(summary)
    assert set(summary.metric) == set(claims.QUANTIZER_METRICS) and (summary.n_seeds == 2).all()
    snr = summary[(summary.metric == "snr_last") & (summary.variant == "upstream")].iloc[0]
    assert snr["mean"] == pytest.approx(2.5) and snr.ci95 == pytest.approx(stats.t_ci95([2.0, 3.0])[1])
    assert claims.threshold_interval_grids(summary) == [600]
    table = claims.threshold_interval(summary, "usage_mean", 600)
    assert list(table.index) == [0.1, 0.3] and list(table.columns) == [1, 5]
    assert table.loc[0.3, 5] == pytest.approx((0.8 + 0.4) / 2)
    headline = summary[claims.is_headline_variant(summary)]
    assert set(headline.variant) == {"upstream", "fixed_rel th=0.1 every=5"}


def test_codec_summary_is_over_seeds_with_several_and_over_windows_with_one():
    items = pd.DataFrame({"arm": ["a"] * 4 + ["b"] * 2, "seed": [0, 0, 1, 1, 0, 0], "bandwidth": 6.0,
                          "item": ["x", "y"] * 3, "si_sdr": [1.0, 3.0, 5.0, 7.0, 0.0, 2.0],
                          "mel_distance": 1.0})
    levels = pd.DataFrame({"arm": ["a", "b"], "bandwidth": 6.0, "usage": [0.5, 0.25], "perplexity": 10.0,
                           "entropy_kbps": 5.0, "bitrate_efficiency": 0.8})
    opus = pd.DataFrame({"bandwidth": 6.0, "kbps": 6.3, "item": ["x", "y"], "si_sdr": [1.0, 2.0],
                         "mel_distance": 3.0, "visqol_audio": 2.0})
    table = claims.codec_summary(items, levels, opus).set_index("arm")
    assert table.loc["a", "ci_over"] == "2 seeds" and table.loc["b", "ci_over"] == "2 items"
    assert table.loc["a", "si_sdr_db"] == pytest.approx(4.0)  # a study table: the study's column names
    assert table.loc["a", "si_sdr_db_ci95"] == pytest.approx(stats.t_ci95([2.0, 6.0])[1])
    assert table.loc["b", "usage"] == 0.25 and math.isnan(table.loc["a"].get("visqol", math.nan))
    assert table.loc["opus", "bandwidth_kbps"] == 6.3 and table.loc["opus", "si_sdr_db"] == pytest.approx(1.5)
    assert not {"si_sdr", "kbps", "visqol_audio", "bandwidth"} & set(table.columns)


def test_paper_anchor_and_headline_take_the_focus_bandwidth_and_the_nearest_opus():
    summary = pd.DataFrame({"arm": ["none", "none", "opus", "opus"], "bandwidth_kbps": [1.5, 6.0, 4.5, 5.5],
                            "si_sdr_db": [1.0, 2.0, -7.0, 3.0], "si_sdr_db_ci95": [0.1, 0.2, 1.0, 1.0],
                            "visqol": [2.0, 3.0, 1.0, 2.5], "usage": [0.5, 0.6, math.nan, math.nan]})
    anchor = claims.paper_anchor(summary, 6.0)
    assert list(anchor.system) == ["EnCodec paper, 24 kHz streamable", "Opus (paper)", "this study: none",
                                   "this study: opus"]
    assert anchor.bandwidth_kbps.tolist()[2:] == [6.0, 5.5]
    assert anchor.si_sdr_db.tolist() == [6.67, 2.45, 2.0, 3.0]  # the paper's numbers from analysis.anchors
    head = claims.compare_headline(summary, 6.0, True, 3, [0, 1], plateau=False)
    assert head["upstream_identical_to_none"] is True and head["runs"] == 3 and head["seeds"] == [0, 1]
    assert head["arms"] == {"none": {"si_sdr_db": 2.0, "si_sdr_db_ci95": 0.2, "visqol": 3.0, "usage": 0.6}}
    assert set(head["opus"]) == {"4.5", "5.5"} and head["codecs_on_initial_plateau"] is False
