"""The regime map: results/regimes.csv from the runs on disk, paired gaps and the cost view (steps to reach)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT

from studylib.analysis import regimes

RESULTS = ROOT / "results"


def test_crossing_interpolates_between_logged_steps_and_says_when_it_is_a_bound():
    steps, values = np.array([250.0, 500.0, 750.0]), np.array([1.0, 3.0, 5.0])
    assert regimes.crossing(steps, values, 4.0) == (625.0, False)
    assert regimes.crossing(steps, values, 0.5) == (250.0, True), "reached at the first point: an upper bound"
    reached, bound = regimes.crossing(steps, values, 9.0)
    assert math.isnan(reached) and not bound


def curves() -> pd.DataFrame:
    """Two seeds: fixed_rel's curve is none's shifted 250 steps earlier (seed 0) and 500 steps (seed 1)."""
    rows = []
    for seed, shift in ((0, 250), (1, 500)):
        for step in range(250, 3001, 250):
            rows.append({"arm": "none", "seed": seed, "step": step, "si_sdr": step / 100})
            rows.append({"arm": "fixed_rel", "seed": seed, "step": step, "si_sdr": (step + shift) / 100})
    return pd.DataFrame(rows)


def test_steps_to_reach_counts_the_steps_saved_per_seed_and_summarises_them_with_an_interval():
    cost = regimes.steps_to_reach(curves(), milestones=(1000, 3000))
    saved = cost.set_index(["seed", "milestone"]).steps_saved
    assert saved[(0, 1000)] == pytest.approx(250) and saved[(1, 1000)] == pytest.approx(500)
    assert saved[(1, 3000)] == pytest.approx(500)
    summary = regimes.cost_summary(cost).set_index("milestone")
    assert summary.loc[1000, "steps_saved"] == pytest.approx(375) and summary.loc[1000, "seeds"] == 2
    assert summary.loc[1000, "steps_saved_ci95"] > 0 and summary.loc[1000, "never_reached"] == 0


def test_end_gaps_pair_the_arms_seed_by_seed_and_use_each_kind_of_quality():
    rows = []
    for kind, column in (("codec", "si_sdr_db"), ("quantizer", "snr_db")):
        for seed in (0, 1, 2):
            for arm, value in (("none", 1.0 + seed), ("fixed_rel", 3.0 + seed)):
                rows.append({"regime": kind, "scale": "s", "kind": kind, "bins": 64, "n_q": 1, "frames_per_step": 600,
                             "encoder": "frozen", "step": 100, "arm": arm, "seed": seed,
                             "usage": 0.5, column: value, "si_sdr_db" if column == "snr_db" else "snr_db": np.nan})
    rows.append({**rows[0], "seed": 9, "arm": "none", "si_sdr_db": 50.0})  # an unpaired seed does not count
    gaps = regimes.end_gaps(pd.DataFrame(rows)).set_index(["regime", "metric"])
    assert gaps.loc[("codec", "si_sdr_db"), "diff"] == pytest.approx(2.0)
    assert gaps.loc[("codec", "si_sdr_db"), "paired_seeds"] == 3
    assert gaps.loc[("quantizer", "snr_db"), "ci95"] == pytest.approx(0.0)
    assert gaps.loc[("codec", "usage"), "diff"] == pytest.approx(0.0)
    decision = regimes.decision_table(regimes.last_gaps(gaps.reset_index())).set_index("regime")
    assert decision.loc["codec", "verdict"] == "better end point" and decision.loc["codec", "seeds"] == 3
    assert "| codec | 64 x 1 | 600 | frozen | 100 | 3 | SI-SDR 2.00 ± 0.00 |" in regimes.decision_markdown(
        decision.reset_index())
    assert regimes.verdict(0.1, 0.2, 3) == "no resolved gap" and regimes.verdict(0.5, math.nan, 1).startswith("one")
    read_back = decision.reset_index().assign(setting=math.nan)  # decision_table.csv as pandas reads an empty cell
    shown = regimes.decision_markdown(read_back)
    assert "| codec | 64 x 1 |" in shown and "nan" not in shown


@pytest.mark.skipif(not (RESULTS / "regimes.csv").is_file(), reason="no committed regime map")
def test_committed_regime_map_matches_the_runs_it_names():
    committed = pd.read_csv(RESULTS / "regimes.csv")
    assert list(committed.columns) == regimes.COLUMNS
    # a quantizer cell that finishes after the commit adds rows on disk, never changes the committed ones
    fresh = regimes.regimes_table(RESULTS)
    fresh = fresh[fresh.run.isin(set(committed.run))].reset_index(drop=True)
    pd.testing.assert_frame_equal(committed, fresh.astype(committed.dtypes.to_dict()), check_exact=False,
                                  rtol=1e-9)
    codec = committed[(committed.regime == "codec K=4096 x1 600f trained") & committed.arm.isin(["none", "fixed_rel"])]
    assert codec.groupby("arm").seed.nunique().to_dict() == {"fixed_rel": 3, "none": 3}
    assert (codec.groupby(["arm", "seed"]).step.max() >= 3000).all()
    longer = committed[committed.regime == "codec K=4096 x1 600f trained 10000 steps"]  # issue 37
    assert set(longer.arm) <= {"none", "fixed_rel"} and (longer.train_steps == 10000).all()


@pytest.mark.skipif(not list((RESULTS / "regimes" / "runs").glob("*/eval_test_step500_bands.parquet")),
                    reason="no committed sub-band scores")
def test_the_band_table_reads_every_scored_step_of_the_runs_that_kept_sub_band_scores():
    """Issue 38: the small codec's K = 4096 runs carry sub-band tables at every milestone and the end."""
    bands = regimes.band_table(RESULTS, ("regimes",))
    longer = bands[bands.regime == "codec K=4096 x1 600f trained 10000 steps"]
    assert set(longer.arm) == {"none", "fixed_rel"} and set(longer.bandwidth_kbps) == {0.9}
    for _, run in longer.groupby("run"):
        assert sorted(run.step.unique()) == [500, 1000, 2000, 3000, 5000, 7500, 10000]
        assert (run.groupby("step").band.nunique() == 3).all() and (run.windows == 64).all()
    summary = regimes.band_summary(longer)
    assert len(summary) == len(longer.drop_duplicates(["arm", "step", "band"]))
    # the small codec passes the band below 1 kHz and drops 1-4 kHz at 0.9 kbps (issue 38's question)
    last = summary[summary.step == 10000].set_index(["arm", "band"]).energy_ratio
    assert (last.xs("1-4 kHz", level="band") < 0.2).all() and (last.xs("0-1 kHz", level="band") > 0.3).all()


def test_regime_names_keep_their_defaults_and_add_horizon_model_and_init_cure():
    assert regimes.regime_name("codec", 4096, 1, 600, "trained") == "codec K=4096 x1 600f trained"
    assert regimes.regime_name("codec", 4096, 1, 600, "trained", train_steps=3000) == "codec K=4096 x1 600f trained"
    long = regimes.regime_name("codec", 4096, 1, 600, "trained", train_steps=10000)
    cure = regimes.regime_name("codec", 4096, 1, 600, "trained", init="warm-up 250, k-means on 4800")
    big = regimes.regime_name("codec", 4096, 1, 600, "trained", model="encodec_24khz")
    assert [regimes.setting_of(n) for n in (long, cure, big)] == ["10000 steps", "init cure", "encodec_24khz"]
    assert regimes.regime_name("quantizer", 4096, 1, 600, "frozen", train_steps=10000) == \
        "quantizer K=4096 x1 600f frozen"


def test_which_cure_pairs_every_arm_and_init_with_none_and_fixed_rel_by_seed():
    from studylib.analysis import findings, stats

    rows = []
    for arm, init, base in (("none", "first batch", 0.0), ("fixed_rel", "first batch", 2.0),
                            ("none", "warm-up 250, k-means on 4800", 1.0), ("simvq", "first batch", -3.0)):
        for seed in (0, 1, 2):
            rows.append({"scale": "regimes", "arm": arm, "seed": seed, "run": f"{arm}-{init[:4]}-s{seed}", "bins": 4096,
                         "n_q": 1, "final": True, "bandwidth_kbps": 0.9, "si_sdr_db": base + 0.1 * seed,
                         "mel_distance": 4.0, "usage": 0.1 + base / 10, "entropy_kbps": 0.7, "model": "small",
                         "train_steps": 3000, "init": init})
    rows.append({**rows[0], "train_steps": 10000, "si_sdr_db": 99.0})  # another horizon: left out
    table = findings.which_cure(pd.DataFrame(rows)).set_index("arm")
    assert list(table.index) == ["none", "fixed_rel", "none + init cure", "simvq"]
    assert table.loc["none", "si_sdr_db"] == pytest.approx(0.1)
    assert table.loc["none + init cure", "vs_none_si_sdr_db"] == pytest.approx(1.0)
    assert table.loc["none + init cure", "vs_fixed_rel_si_sdr_db"] == pytest.approx(-1.0)
    assert table.loc["simvq", "vs_fixed_rel_seeds"] == 3
    assert table.loc["fixed_rel", "si_sdr_db_ci95"] == pytest.approx(stats.t_ci95([2.0, 2.1, 2.2])[1])
    assert "`none + init cure` | 3 |" in findings.which_cure_markdown(table.reset_index())


def test_architecture_table_pairs_the_arms_per_model_and_step_at_the_runs_bitrate():
    from studylib.analysis import findings

    rows = []
    for model, seeds, gap in (("small", (0, 1, 2), 2.0), ("encodec_24khz", (0,), 3.0)):
        for arm in ("none", "fixed_rel"):
            for seed in seeds:
                for steps, final in ((500, False), (3000, True)):
                    for kbps in (0.9, 1.5):  # the run's bitrate is its lowest: 1.5 is left out
                        rows.append({"scale": "regimes", "arm": arm, "seed": seed, "run": f"{model}-{arm}-s{seed}",
                                     "bins": 4096, "n_q": 1, "steps": steps, "final": final, "bandwidth_kbps": kbps,
                                     "si_sdr_db": (gap if arm == "fixed_rel" else 0.0) + 0.1 * seed + 10 * (kbps > 1),
                                     "usage": 0.9 if arm == "fixed_rel" else 0.1, "entropy_kbps": 0.5,
                                     "model": model, "train_steps": 3000, "init": "first batch"})
    rows.append({**rows[0], "init": "warm-up 250, k-means on 4800", "si_sdr_db": 99.0})  # the init cure: left out
    table = findings.architecture_table(pd.DataFrame(rows)).set_index(["model", "steps"])
    assert sorted(table.index) == [("encodec_24khz", 500), ("encodec_24khz", 3000), ("small", 500), ("small", 3000)]
    assert table.loc[("small", 3000), "gap_si_sdr_db"] == pytest.approx(2.0)
    assert table.loc[("small", 3000), "gap_si_sdr_db_ci95"] == pytest.approx(0.0, abs=1e-9)
    assert table.loc[("encodec_24khz", 500), "gap_si_sdr_db"] == pytest.approx(3.0)
    assert math.isnan(table.loc[("encodec_24khz", 500), "gap_si_sdr_db_ci95"])  # one seed: no interval
    assert table.loc[("small", 500), "none_si_sdr_db"] == pytest.approx(0.1)  # mean over seeds at 0.9 kbps
    assert table.loc[("small", 500), "gap_usage"] == pytest.approx(0.8) and (table.paired_seeds > 0).all()
    text = findings.architecture_markdown(table.reset_index())
    assert "| `encodec_24khz` | 3,000 | 1 | 0.00 / 3.00 / 3.00 |" in text
