"""Audit: EMA codebook statistics of EnCodec-format state dicts, code use on audio, checkpoints, CLI."""

from __future__ import annotations

import math
import warnings

import pandas as pd
import pytest
import torch

from studylib.analysis.audit import audit, audit_state_dict, audit_usage, cli
from studylib.model.codec import Codec
from studylib.training.run_folder import load_checkpoint

torch.set_flush_denormal(True)

FRAMES = 2 * 150  # frames per quantizer step below


@pytest.fixture(scope="module")
def encodec_model():
    """A random-weight EnCodec 24 kHz model whose first two codebooks ran three training steps."""
    encodec = pytest.importorskip("encodec")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # encodec uses torch's deprecated weight_norm
        model = encodec.EncodecModel.encodec_model_24khz(pretrained=False)
    for layer in model.quantizer.vq.layers:
        layer._codebook.kmeans_iters = 2  # EnCodec's k-means materialises n x K x d: keep it short
    model.quantizer.train()
    with torch.no_grad():
        for step in range(3):
            model.quantizer(torch.randn(2, 128, FRAMES // 2) + step, 75, 1.5)  # 1.5 kbps: levels 0 and 1
    return model.eval()


def test_levels_match_the_buffers(encodec_model):
    state = encodec_model.state_dict()
    levels = audit_state_dict(state, frames_per_step=FRAMES)
    assert len(levels) == 32 and levels["level"].tolist() == list(range(32))
    assert levels["inited"].tolist() == [True, True] + [False] * 30
    for level in (0, 1):
        counts = state[f"quantizer.vq.layers.{level}._codebook.cluster_size"]
        embed = state[f"quantizer.vq.layers.{level}._codebook.embed"]
        row = levels.iloc[level]
        assert row["sum"] == pytest.approx(float(counts.sum()), rel=1e-6)
        assert row["sum"] == pytest.approx(FRAMES, rel=1e-4)  # EMA counts sum to the frames per step
        assert row["sum_per_frame"] == pytest.approx(1.0, rel=1e-4)
        assert (row["min"], row["max"]) == pytest.approx((float(counts.min()), float(counts.max())))
        assert row["below"] == int((counts < 2).sum())
        assert row["below_rel"] == int((counts < 0.1 * counts.sum() / 1024).sum())
        assert row["dead_floor"] == 1024 - math.floor(row["sum"] / 2) <= row["below"]  # <= N / 2 codes reach 2
        assert row["embed_norm_median"] == pytest.approx(float(embed.double().norm(dim=1).quantile(0.5)))
    assert (levels["sum"].iloc[2:] == 0).all()


def test_any_state_dict_layout(encodec_model):
    """Whole EnCodec model, its bare quantizer and our Codec read the same."""
    expected = audit_state_dict(encodec_model.state_dict())
    pd.testing.assert_frame_equal(audit_state_dict(encodec_model.quantizer.state_dict()), expected)
    pd.testing.assert_frame_equal(audit_state_dict(Codec.from_encodec(encodec_model.state_dict()).state_dict()),
                                  expected)
    with pytest.raises(ValueError, match="no RVQ codebooks"):
        audit_state_dict({"encoder.weight": torch.zeros(1)})


def test_peer_state_dict():
    peer = pytest.importorskip("studylib.quantizers.peer")
    q = peer.PeerResidualVQ(dimension=8, n_q=2, bins=32, kmeans_iters=2).train()
    q(torch.randn(2, 8, 40), 75.0)
    levels = audit_state_dict(q.state_dict())
    assert levels["sum"].tolist() == pytest.approx([float(cb.cluster_size.sum()) for cb in q.codebooks])
    assert levels["below"].tolist() == [int(cb.dead_mask().sum()) for cb in q.codebooks]


def test_encodec_file_with_audio(encodec_model, tmp_path):
    path = tmp_path / "encodec_24khz-test.th"
    torch.save(encodec_model.state_dict(), path)
    wav = torch.randn(1, 24_000) * 0.1
    report = audit(path, [wav], bandwidth=1.5)
    assert "EnCodec" in report.source
    codes = Codec.from_encodec(encodec_model.state_dict()).eval().encode(wav[None], 1.5)
    assert report.usage["used"].tolist() == [len(level.unique()) for level in codes]
    assert report.usage["frames"].tolist() == [75, 75]
    assert report.usage["bandwidth"].tolist() == [1.5, 1.5]


def test_run_checkpoint(smoke_run, synthetic_manifest):
    report = audit(smoke_run, synthetic_manifest, bandwidth=3.0)
    codec, _cfg, ckpt = load_checkpoint(smoke_run)
    sums = [float(ckpt["model"][f"quantizer.vq.layers.{i}._codebook.cluster_size"].sum()) for i in range(4)]
    assert report.levels["sum"].tolist() == pytest.approx(sums)
    assert report.levels["frames_per_step"].tolist() == [76.0] * 4  # 2 x ceil(0.5 s x 75 Hz)
    assert "studylib run" in report.source
    again = audit_usage(codec, synthetic_manifest, bandwidth=3.0)
    pd.testing.assert_frame_equal(report.usage, again)
    assert len(again) == 4 and (again["used"] >= 1).all()
    assert (again["usage"] == again["used"] / 1024).all()


def test_cli(smoke_run, synthetic_manifest, tmp_path, capsys):
    out = tmp_path / "report.csv"
    assert cli([str(smoke_run / "checkpoint.pt"), "--manifest", str(synthetic_manifest), "--bandwidth", "1.5",
                "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "studylib run checkpoint" in printed and "code use on" in printed
    table = pd.read_csv(out)
    assert len(table) == 4
    assert table["eval_usage"].notna().tolist() == [True, True, False, False]  # 1.5 kbps: two levels


def test_not_a_checkpoint(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
        audit(text)
    assert cli([str(text)]) == 2
    assert "not a PyTorch checkpoint" in capsys.readouterr().err
    listing = tmp_path / "list.pt"
    torch.save([1, 2], listing)
    with pytest.raises(ValueError, match="not a model checkpoint"):
        audit(listing)
    assert cli([str(tmp_path / "missing.th")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    quantizer_only = tmp_path / "rvq.th"
    torch.save({"vq.layers.0._codebook.inited": torch.ones(1), "vq.layers.0._codebook.cluster_size": torch.ones(4),
                "vq.layers.0._codebook.embed": torch.ones(4, 2)}, quantizer_only)
    assert audit(quantizer_only).levels["sum"].tolist() == [4.0]
    with pytest.raises(ValueError, match="quantizer only"):
        audit(quantizer_only, [torch.zeros(24_000)])
