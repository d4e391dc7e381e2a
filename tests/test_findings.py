"""Findings: results/summary.csv from the runs on disk, and the READMEs' headline table agreeing with it."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from conftest import ROOT

from studylib.analysis import findings

RESULTS = ROOT / "results"


def toy_summary() -> pd.DataFrame:
    rows = []
    for arm, base in (("none", 3.0), ("fixed_rel", 3.5)):
        for seed, noise in zip((0, 1, 2), (0.0, 0.2, -0.1)):
            rows.append({"scale": "cpu", "arm": arm, "seed": seed, "run": f"{arm}-s{seed}", "steps": 500,
                         "final": True, "bandwidth_kbps": 6.0,
                         "si_sdr_db": base + noise, "mel_distance": 3.5, "visqol": 3.0, "usage": 0.5,
                         "perplexity": 200.0, "perplexity_l0": 100.0 + seed, "entropy_kbps": 5.0})
    rows.append({"scale": "cpu", "arm": "opus", "seed": None, "run": "opus", "bandwidth_kbps": 6.0, "si_sdr_db": 2.8,
                 "mel_distance": 3.45, "visqol": 2.8, "payload_kbps": 5.5})
    return pd.DataFrame(rows, columns=findings.COLUMNS)


def test_headline_is_mean_and_t_interval_over_seeds():
    table = findings.headline(toy_summary(), "cpu").set_index("arm")
    assert table.loc["none", "seeds"] == 3
    assert table.loc["none", "si_sdr_db"] == pytest.approx(3.0 + 0.1 / 3)
    # t(0.975, 2) = 4.303; sd of (0, 0.2, -0.1) = 0.1528
    assert table.loc["none", "si_sdr_db_ci95"] == pytest.approx(4.3027 * 0.152753 / math.sqrt(3), rel=1e-3)
    assert "opus (5.5 kbps spent)" in table.index


def test_paired_differences_pair_seeds():
    diffs = findings.paired_differences(toy_summary(), "cpu").set_index("arm")
    assert diffs.loc["fixed_rel", "paired_seeds"] == 3
    assert diffs.loc["fixed_rel", "d_si_sdr_db"] == pytest.approx(0.5)
    assert diffs.loc["fixed_rel", "d_si_sdr_db_ci95"] == pytest.approx(0.0, abs=1e-9)  # same noise per seed


def test_readme_block_is_replaced_and_nothing_else(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# Findings\n\nbefore\n\n{findings.START}\nold table\n{findings.END}\n\nafter\n")
    block = findings.headline_markdown(toy_summary(), "cpu")
    assert findings.update_readme(readme, block)
    text = readme.read_text()
    assert text.startswith("# Findings\n\nbefore\n\n") and text.endswith("\n\nafter\n")
    assert findings.readme_block(readme) == block and "old table" not in text
    assert "| `fixed_rel` | 500 | 3 | 3.53 ± 0.38 |" in block
    assert not findings.update_readme(tmp_path / "missing.md", block)


@pytest.mark.skipif(not (RESULTS / "summary.csv").is_file(), reason="no committed study results")
def test_committed_summary_matches_the_committed_runs():
    committed = pd.read_csv(RESULTS / "summary.csv")
    fresh = findings.summary_table(RESULTS)
    assert list(committed.columns) == findings.COLUMNS
    assert len(committed) == len(fresh)
    pd.testing.assert_frame_equal(committed.drop(columns=["train_minutes"]).reset_index(drop=True),
                                  fresh.drop(columns=["train_minutes"]).astype(committed.drop(
                                      columns=["train_minutes"]).dtypes.to_dict()).reset_index(drop=True),
                                  check_exact=False, rtol=1e-9)


@pytest.mark.skipif(not (RESULTS / "summary.csv").is_file(), reason="no committed study results")
@pytest.mark.parametrize("readme", [RESULTS / "README.md", ROOT / "README.md"])
def test_readme_headline_tables_agree_with_the_committed_summary(readme):
    summary = pd.read_csv(RESULTS / "summary.csv")
    assert findings.readme_block(readme) == findings.headline_markdown(summary, findings.HEADLINE_SCALES, 6.0), readme


def alternatives_summary() -> pd.DataFrame:
    """none and fixed_rel (3 seeds) and the alternatives: dac 3 seeds, +0.5 dB on fixed_rel at 6 kbps with the
    same seed noise, 0.5 dB below it at 24 kbps, and at 1.5 kbps differences of either sign; simvq one seed."""
    rows = []
    for kbps in (1.5, 6.0, 24.0):
        for arm, si_sdr, seeds, minutes in (("none", 3.0, (0, 1, 2), 10.0), ("fixed_rel", 3.5, (0, 1, 2), 10.0),
                                            ("dac", {1.5: 3.5, 6.0: 4.0, 24.0: 3.0}[kbps], (0, 1, 2), 11.0),
                                            ("simvq", 2.0, (0,), 12.0)):
            for seed in seeds:
                noise = (0.4, -0.2, 0.0)[seed] if (arm, kbps) == ("dac", 1.5) else (0.0, 0.2, -0.1)[seed]
                rows.append({"scale": "cpu", "arm": arm, "seed": seed, "run": f"{arm}-s{seed}", "steps": 500,
                             "final": True, "bandwidth_kbps": kbps,
                             "si_sdr_db": si_sdr + noise, "mel_distance": 3.5 + 0.1 * seed, "usage": 0.5,
                             "perplexity_l0": 100.0 + seed, "entropy_kbps": 0.8 * kbps, "train_minutes": minutes})
    return pd.DataFrame(rows, columns=findings.COLUMNS)


def test_alternatives_pair_each_design_with_each_baseline_at_each_bitrate():
    table = findings.alternatives(alternatives_summary(), "cpu")
    assert len(table) == 3 * 2 * 2  # kbps x baselines x arms
    row = table[(table.arm == "dac") & (table.baseline == "fixed_rel") & (table.bandwidth_kbps == 6.0)].iloc[0]
    assert row.paired_seeds == 3 and row.d_si_sdr_db == pytest.approx(0.5) and row.d_mel_distance == 0
    assert row.r_train_minutes == pytest.approx(1.1)
    sim = table[(table.arm == "simvq") & (table.baseline == "none") & (table.bandwidth_kbps == 1.5)].iloc[0]
    assert sim.paired_seeds == 1 and sim.d_si_sdr_db == pytest.approx(-1.0) and math.isnan(sim.d_si_sdr_db_ci95)
    assert findings.alternatives(alternatives_summary(), "gpu").empty


def test_the_answer_says_which_way_the_numbers_fall():
    table = findings.alternatives(alternatives_summary(), "cpu")
    better = findings.answer(table, "dac", 6.0)
    assert better.startswith("dac vs fixed_rel at 6 kbps (3 paired seeds): switching to dac beats fixing the expiry;")
    assert "SI-SDR (dB) +0.50 ± 0.00 (better)" in better and "mel distance +0.000 ± 0.000 (no resolved" in better
    assert better.endswith("training time x1.10 ± 0.00")
    assert "fixing the expiry beats switching to dac" in findings.answer(table, "dac", 24.0)
    assert "no resolved difference in quality between dac and the fixed expiry" in findings.answer(table, "dac", 1.5)
    assert "no verdict on quality" in findings.answer(table, "simvq", 6.0)
    assert findings.answer(table, "dac", 12.0) == "dac vs fixed_rel at 12 kbps: no paired runs"
    # against the other baseline the sentence names that baseline, not the fixed expiry
    assert findings.answer(table, "dac", 24.0, versus="none").startswith(
        "dac vs none at 24 kbps (3 paired seeds): no resolved difference in quality between dac and no expiry;")
