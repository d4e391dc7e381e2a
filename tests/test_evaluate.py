"""Evaluation of a run and of Opus on the same fixed windows, written to disk as tidy tables."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest

from studylib.__main__ import main
from studylib.model import metrics
from studylib.training.evaluate import eval_windows, evaluate, evaluate_opus


@pytest.fixture(scope="module")
def evaluation(smoke_run):
    return evaluate(smoke_run, "test", seconds=1.0, visqol_items=1, progress=False)


def test_items_table_has_every_metric_per_item_and_bandwidth(evaluation, smoke_run, synthetic_manifest):
    _, info = eval_windows(synthetic_manifest, "test", 1.0)
    items = pd.read_parquet(smoke_run / "eval_test.parquet")
    assert len(items) == len(info) * 2  # tiny model: 1.5 and 3 kbps
    assert set(items.bandwidth) == {1.5, 3.0} and set(items.n_q) == {2, 4}
    for column in ("si_sdr", "mel_distance", "visqol_audio", "visqol_speech", "nominal_kbps", "kind", "group"):
        assert column in items, column
    assert items.si_sdr.notna().all() and (items.mel_distance > 0).all()
    # ViSQOL on the first window of each kind only, speech mode only for speech
    scored = items.dropna(subset=["visqol_audio"])
    assert set(scored.item) == {0} and scored.visqol_speech.notna().all()
    assert (items.nominal_kbps == items.n_q * 0.75).all()


def test_levels_table_carries_utilization_and_entropy_bitrate(evaluation, smoke_run):
    levels = pd.read_parquet(smoke_run / "eval_test_levels.parquet")
    assert list(levels.level[levels.bandwidth == 3.0]) == [0, 1, 2, 3]
    assert ((levels.usage > 0) & (levels.usage <= 1)).all()
    top = levels[levels.bandwidth == 3.0]
    assert top.entropy_kbps.iloc[0] <= 3.0 and top.bitrate_efficiency.iloc[0] == pytest.approx(
        top.entropy_kbps.iloc[0] / 3.0)
    frequency = pd.read_parquet(smoke_run / "eval_test_frequency.parquet")
    assert frequency.groupby("level").frequency.sum().round(6).eq(1).all()


def test_examples_are_flac_references_and_reconstructions(evaluation):
    names = {p.name for p in evaluation.examples}
    assert all(p.suffix == ".flac" and p.is_file() for p in evaluation.examples)
    assert any(n.endswith("_reference.flac") for n in names) and any(n.endswith("_1.5kbps.flac") for n in names)


def test_cli_and_errors(smoke_run, tmp_path, capsys):
    # --force: the shared run holds other tests' evaluation, made with other settings
    assert main(["evaluate", str(smoke_run), "--visqol-items", "0", "--bandwidths", "1.5", "--force"]) == 0
    assert "codec" in capsys.readouterr().out
    assert main(["evaluate", str(tmp_path)]) == 2
    assert "no such checkpoint" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("opusenc") is None, reason="opus-tools not installed (apt-get install opus-tools)")
def test_opus_on_the_same_windows(synthetic_manifest, tmp_path):
    table = evaluate_opus(synthetic_manifest, "test", bitrates=(6.0, 24.0), seconds=1.0, visqol_items=0,
                          out=tmp_path / "opus.parquet", progress=False)
    assert pd.read_parquet(tmp_path / "opus.parquet").equals(table)
    mean = table.groupby("bandwidth").si_sdr.mean()
    assert mean[24.0] > mean[6.0]
    assert (table.payload_kbps < table.bandwidth * 1.5).all()
    assert metrics.nominal_kbps(8, 1024, 75) == 6.0


def test_per_kind_keeps_evenly_spread_windows_of_each_kind(ci_data):
    manifest = ci_data / "ci" / "manifest.csv"
    _, every = eval_windows(manifest, "test", 2.0)
    _, some = eval_windows(manifest, "test", 2.0, per_kind=3)
    assert some.groupby("kind").size().eq(3).all() and set(some.kind) == {"speech", "music"}
    assert set(some.item) <= set(every.item) and some.item.is_monotonic_increasing
    for _, group in every.groupby("kind"):  # first and last window of each kind are kept
        assert {group.item.iloc[0], group.item.iloc[-1]} <= set(some.item)
    assert eval_windows(manifest, "test", 2.0, per_kind=3)[1].equals(some)
    with pytest.raises(ValueError, match="per_kind: got 0"):
        eval_windows(manifest, "test", 2.0, per_kind=0)


def test_lower_bandwidths_score_the_same_whether_evaluated_alone_or_together(smoke_run, tmp_path):
    # evaluate() encodes once and decodes prefixes of the codes: it must equal encoding at each bandwidth
    alone = evaluate(smoke_run, "test", (1.5,), seconds=1.0, visqol_items=0, out_dir=tmp_path, progress=False)
    both = evaluate(smoke_run, "test", (3.0, 1.5), seconds=1.0, visqol_items=0, out_dir=tmp_path, progress=False)
    cols = ["item", "si_sdr", "mel_distance", "n_q"]
    low = both.items[both.items.bandwidth == 1.5][cols].reset_index(drop=True)
    pd.testing.assert_frame_equal(alone.items[cols], low)
