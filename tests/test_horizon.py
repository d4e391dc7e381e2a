"""The long-horizon study's pieces (issue 18): milestone checkpoints and their evaluation, summary rows with
`steps` and `final`, paired differences over training, validation gains, targets, sub-band SI-SDR, and the
equivalence rule of the speed work."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from conftest import smoke_config

from studylib.analysis import findings, horizon, records
from studylib.training import evaluate
from studylib.training import train as trainlib
from studylib.training.run_folder import read_checkpoint


@pytest.fixture(scope="module")
def milestone_run(synthetic_manifest, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "fixed_rel-0123456789-s0"
    cfg = smoke_config(synthetic_manifest, run_dir, milestones=[5, 10], expiry_mode="fixed", expiry_threshold=1.0)
    assert trainlib.train(cfg).status == "complete"
    evaluate.evaluate(run_dir, "test", per_kind=2, visqol_items=0, examples_per_kind=0, progress=False)
    return run_dir


def test_milestones_keep_their_checkpoints_and_are_scored_once(milestone_run, synthetic_manifest):
    assert sorted(evaluate.milestone_checkpoints(milestone_run)) == [5, 10]
    assert evaluate.evaluate_milestones(milestone_run, per_kind=2, progress=False) == [5, 10]
    written = {p: p.stat().st_mtime_ns for p in milestone_run.glob("eval_test_step*.parquet")}
    assert len(written) == 6  # items, levels, frequency per milestone
    evaluate.evaluate_milestones(milestone_run, per_kind=2, progress=False)  # already scored: nothing rewritten
    assert {p: p.stat().st_mtime_ns for p in milestone_run.glob("eval_test_step*.parquet")} == written
    step5 = pd.read_parquet(milestone_run / "eval_test_step5.parquet")
    assert set(step5.bandwidth) == {1.5} and "visqol_audio" not in step5  # the tiny model's only milestone kbps
    # the milestone checkpoint is the state after 5 steps, not the final one
    ckpt5 = read_checkpoint(milestone_run / "checkpoint_step5.pt")
    assert ckpt5["step"] == 5


def test_milestones_get_their_sub_band_scores_when_asked(milestone_run, synthetic_manifest):
    """Issue 38: sub-band SI-SDR and energy ratios at every milestone, beside (not instead of) the other scores."""
    import shutil

    run = milestone_run.parent / "bands_milestones"
    shutil.copytree(milestone_run, run)
    evaluate.evaluate_milestones(run, per_kind=2, progress=False)  # as before: no bands, none in its settings
    assert "bands" not in evaluate.read_json(run / "eval_test_step5.json") and not list(run.glob("*_bands.parquet"))
    assert horizon.band_rows(run, final_step=20).empty  # kept none: empty, with its columns
    assert evaluate.evaluate_milestones(run, per_kind=2, progress=False, bands=True) == [5, 10]  # made again
    written = {p: p.stat().st_mtime_ns for p in run.glob("eval_test_step*_bands.parquet")}
    assert sorted(p.name for p in written) == ["eval_test_step10_bands.parquet", "eval_test_step5_bands.parquet"]
    evaluate.evaluate_milestones(run, per_kind=2, progress=False, bands=True)  # whole and current: not made again
    assert {p: p.stat().st_mtime_ns for p in run.glob("eval_test_step*_bands.parquet")} == written
    items = pd.read_parquet(run / "eval_test_step5.parquet")
    bands = pd.read_parquet(run / "eval_test_step5_bands.parquet")
    assert sorted(bands.band.unique()) == ["0-1 kHz", "1-4 kHz", "4-12 kHz"]
    assert len(bands) == 3 * len(items) and set(bands.item) == set(items.item)
    # the full-band column is the items table's SI-SDR on the same decoded audio (float64 here, float32 there);
    # the bands cover 0-12 kHz
    full = bands.drop_duplicates("item").set_index("item").full_band_si_sdr.sort_index()
    assert full.to_numpy() == pytest.approx(items.set_index("item").si_sdr.sort_index().to_numpy(), rel=1e-2)
    assert bands.groupby("item").energy_share.sum().to_numpy() == pytest.approx(1.0, abs=1e-2)
    assert evaluate.read_json(run / "eval_test_step5.json")["bands"] is True
    curve = horizon.band_rows(run, final_step=20)
    assert sorted(curve.step.unique()) == [5, 10] and (curve.windows == items.item.nunique()).all()
    step5 = curve[curve.step == 5].set_index("band")
    assert step5.si_sdr.to_dict() == pytest.approx(bands.groupby("band").si_sdr.mean().to_dict())


def test_add_bands_gives_an_evaluated_run_its_sub_band_tables_and_touches_nothing_else(milestone_run, capsys):
    """Runs evaluated before sub-band scores existed get them for every checkpoint on disk, on the same windows."""
    import shutil

    run = milestone_run.parent / "add_bands"
    shutil.copytree(milestone_run, run)
    evaluate.evaluate_milestones(run, per_kind=2, progress=False)
    (run / "eval_test_step5.json").rename(run / "kept.json")
    assert evaluate.cli([str(run), "--add-bands"]) == 2  # no evaluation of that checkpoint: it says so, writes none
    assert "eval_test_step5.json: no evaluation of checkpoint_step5.pt" in capsys.readouterr().err
    (run / "kept.json").rename(run / "eval_test_step5.json")
    for table in run.glob("*_bands.parquet"):
        table.unlink()
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir() if p.is_file()}
    assert evaluate.cli([str(run), "--add-bands"]) == 0
    added = {p.name: p.stat().st_mtime_ns for p in run.iterdir() if p.is_file()}
    assert sorted(set(added) - set(before)) == ["eval_test_bands.parquet", "eval_test_step10_bands.parquet",
                                                 "eval_test_step5_bands.parquet"]
    assert {k: added[k] for k in before} == before  # every other file as it was
    items, bands = pd.read_parquet(run / "eval_test.parquet"), pd.read_parquet(run / "eval_test_bands.parquet")
    assert set(bands.item) == set(items.item) and set(bands.bandwidth) == set(items.bandwidth)
    assert evaluate.add_band_scores(run, progress=False) == []  # each newer than its checkpoint: kept


def test_summary_rows_carry_steps_and_final(milestone_run):
    rows = pd.DataFrame(findings.run_rows(records.read_run(milestone_run), "smoke"))
    assert sorted(set(zip(rows.steps, rows.final))) == [(5, False), (10, False), (20, True)]
    final = rows[rows.final]
    assert set(final.bandwidth_kbps) == {1.5, 3.0} and final.visqol.isna().all()


def toy_long() -> pd.DataFrame:
    rows = []
    for steps, gap in ((500, 1.0), (1000, 0.5), (3000, 0.0)):
        for arm, shift in (("none", 0.0), ("fixed_rel", gap)):
            for seed, noise in zip((0, 1, 2), (0.0, 0.3, -0.3)):
                for kbps in (1.5, 6.0, 24.0):
                    rows.append({"scale": "long", "arm": arm, "seed": seed, "run": f"{arm}-s{seed}", "steps": steps,
                                 "final": steps == 3000, "bandwidth_kbps": kbps,
                                 "si_sdr_db": kbps / 3 + shift + (noise if arm == "fixed_rel" else 0.0),
                                 "mel_distance": 3.0 - kbps / 30, "usage": 0.5 + shift / 4, "entropy_kbps": 0.8 * kbps,
                                 "perplexity_l0": 100.0})
    rows.append({"scale": "long", "arm": "opus", "final": True, "bandwidth_kbps": 6.0, "si_sdr_db": 2.8,
                 "mel_distance": 3.45})
    return pd.DataFrame(rows, columns=findings.COLUMNS)


def test_paired_over_steps_follows_the_gap_with_intervals():
    paired = findings.paired_over_steps(toy_long(), "long").set_index(["steps", "bandwidth_kbps", "metric"])
    assert paired.loc[(500, 6.0, "si_sdr_db"), "diff"] == pytest.approx(1.0)
    assert paired.loc[(3000, 6.0, "si_sdr_db"), "diff"] == pytest.approx(0.0, abs=1e-12)
    # t(0.975, 2) x sd(0, 0.3, -0.3) / sqrt(3)
    assert paired.loc[(3000, 6.0, "si_sdr_db"), "ci95"] == pytest.approx(4.3027 * 0.3 / math.sqrt(3), rel=1e-3)
    assert paired.loc[(500, 6.0, "usage"), "diff"] == pytest.approx(0.25)
    assert (paired.paired_seeds == 3).all()


def test_headline_shows_each_horizon_once_with_its_steps():
    summary = pd.concat([toy_long(), toy_long().assign(scale="cpu", steps=500)], ignore_index=True)
    block = findings.headline_markdown(summary, ("cpu", "long"))
    lines = block.splitlines()
    assert lines[0].startswith("| arm | steps | seeds |")
    assert [line.split(" | ")[1] for line in lines[2:6]] == ["500", "500", "3,000", "3,000"]
    assert sum(line.startswith("| opus") for line in lines) == 1


def test_targets_compare_with_opus_and_the_bitrate_rise():
    table = horizon.targets(toy_long(), ("none", "fixed_rel")).set_index("arm")
    assert table.loc["none", "steps"] == 3000
    assert table.loc["none", "si_sdr_6kbps"] == pytest.approx(2.0)
    assert not table.loc["none", "beats_opus_si_sdr"] and table.loc["none", "beats_opus_mel"]
    assert table.loc["none", "si_sdr_24_minus_1.5"] == pytest.approx(7.5) and table.loc["none", "rises_4db"]


def test_gains_measure_the_rise_over_each_window():
    curves = pd.DataFrame([{"arm": "none", "seed": s, "step": step, "si_sdr": step / 1000 + s}
                           for s in (0, 1) for step in range(250, 3001, 250)])
    gains = horizon.gains(curves).set_index("to_step")
    assert list(gains.index) == [1000, 1500, 2000, 2500, 3000]
    assert gains.si_sdr_db_gain.tolist() == pytest.approx([0.5] * 5) and (gains.n_seeds == 2).all()


def test_equivalence_passes_within_tolerance_or_when_the_interval_covers_zero():
    base = toy_long()[lambda f: f.final & (f.arm != "opus")]
    close = base.assign(si_sdr_db=base.si_sdr_db + 0.01)
    shifted = base.assign(si_sdr_db=base.si_sdr_db + 0.5)
    noisy = base.assign(si_sdr_db=base.si_sdr_db + base.seed.map({0: 0.01, 1: 2.0, 2: -1.0}))
    for candidate, passes in ((close, True), (shifted, False), (noisy, True)):
        table = findings.equivalence(base, candidate)
        si = table[table.metric == "si_sdr_db"]
        assert (si.paired_seeds == 3).all() and si.passes.all() == passes
    assert findings.equivalence(base, close).query("metric == 'usage'").passes.isna().all()  # reported only
    # a run not trained again (rows equal to the baseline's) is no evidence: left out of the pairs
    partly = pd.concat([close[close.seed != 2], base[base.seed == 2]])
    assert (findings.equivalence(base, partly).paired_seeds == 2).all()
    assert (findings.equivalence(base, base.copy()).paired_seeds == 0).all()


def test_findings_write_the_equivalence_table_when_a_baseline_is_kept(tmp_path):
    base = toy_long()[lambda f: f.final & (f.arm != "opus")].assign(scale="cpu")
    assert findings.write_equivalence(tmp_path, base) is None  # no baseline kept: nothing written
    (tmp_path / "equivalence").mkdir()
    base.to_csv(tmp_path / "equivalence" / "baseline_fp32_eager.csv", index=False)
    path = findings.write_equivalence(tmp_path, base.assign(si_sdr_db=base.si_sdr_db + 0.1))
    table = pd.read_csv(path)
    assert set(table.baseline) == {"fp32_eager"} and len(table) == 2 * 3 * len(findings.EQUIVALENCE_METRICS)
    assert table[table.metric == "si_sdr_db"]["diff"].tolist() == pytest.approx([0.1] * 6)


def test_band_scores_are_kept_beside_the_run_and_read_back_without_its_checkpoint(milestone_run, synthetic_manifest,
                                                                                  capsys):
    """07 re-renders on a fresh checkout (no checkpoints): the sub-band table of each run is kept in its folder."""
    import shutil

    from studylib.training.manifest import load_manifest

    sources = sorted(load_manifest(synthetic_manifest).query("split == 'test'").source.unique())
    run = milestone_run.parent / "bands_run"
    shutil.copytree(milestone_run, run)
    first = horizon.cached_band_scores(run, synthetic_manifest, sources, [1.5], per_kind=2)
    kept = run / horizon.BANDS_FILE
    assert kept.is_file() and len(first) and set(first.bandwidth) == {1.5} and set(first.source) == set(sources)
    (run / "checkpoint.pt").unlink()
    again = horizon.cached_band_scores(run, synthetic_manifest, sources, [1.5], per_kind=2)
    pd.testing.assert_frame_equal(again, first)
    assert horizon.cached_band_scores(run, synthetic_manifest, ["no such source"], [1.5]).empty
    assert "no eval_test_bands.parquet for these sources and no checkpoint.pt" in capsys.readouterr().err
