"""The quantizer-only fast path: latents of a run's encoder, RVQ variants trained alone on them."""

from __future__ import annotations

import pytest
import torch

from studylib import config as cfglib
from studylib.__main__ import main
from studylib.latents import LatentRunConfig, Latents, dump_latents, train_on_latents
from studylib.train import load_checkpoint


@pytest.fixture(scope="module")
def latents(smoke_run) -> Latents:
    return Latents.load(dump_latents(smoke_run, progress=False))


def test_latents_are_the_encoder_output_of_every_segment(smoke_run, latents, synthetic_manifest):
    from studylib.corpus import load_manifest

    codec, cfg, _ = load_checkpoint(smoke_run)
    rows = load_manifest(synthetic_manifest)
    for split in ("train", "valid", "test"):
        frames, offsets = latents.frames[split], latents.offsets[split]
        assert frames.shape[1] == cfg.codec_config().dimension
        assert len(offsets) == (rows.split == split).sum() + 1 and offsets[-1] == len(frames)
        expected = sum(-(-round(s * 24_000) // codec.config.hop_length) for s in rows.seconds[rows.split == split])
        assert len(frames) == expected
    assert latents.frame_rate == 75


def test_cli_writes_latents_and_rejects_a_missing_checkpoint(smoke_run, tmp_path, capsys):
    assert main(["latents", str(smoke_run), "--out", str(tmp_path / "l.pt")]) == 0
    assert "train" in capsys.readouterr().out and (tmp_path / "l.pt").is_file()
    assert main(["latents", str(tmp_path / "nothing")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err


def test_rvq_alone_on_latents_logs_usage_and_snr(latents):
    cfg = cfglib.build(LatentRunConfig, [{"n_q": 2, "bins": 64, "frames_per_step": 150, "steps": 40,
                                          "kmeans_iters": 5, "log_every": 10, "eval_every": 20,
                                          "expiry_mode": "fixed", "expiry_threshold": 0.5,
                                          "expiry_threshold_kind": "relative"}])
    metrics, rvq = train_on_latents(cfg, latents.frames["train"], latents.frames["valid"], progress=False)
    train_rows, eval_rows = metrics[metrics.split == "train"], metrics[metrics.split == "eval"]
    assert list(train_rows.step) == [10, 20, 30, 40] and list(eval_rows.step) == [20, 40]
    assert (train_rows.used_l0 > 1).all() and (train_rows.used_l0 <= 64).all()
    snr = eval_rows[["snr_l0", "snr_l1"]].iloc[-1]
    assert snr.snr_l1 > snr.snr_l0 > 0, "each level must reduce the residual"
    again, _ = train_on_latents(cfg, latents.frames["train"], latents.frames["valid"], progress=False)
    assert again.equals(metrics), "same config and seed, same metrics"
    assert torch.isfinite(rvq.codebooks[0].embed).all()


def test_latent_run_config_errors_name_the_field():
    with pytest.raises(cfglib.ConfigError, match="^frames_per_step: got 100, allowed a multiple of crop_frames"):
        cfglib.build(LatentRunConfig, [{"frames_per_step": 100}])
    with pytest.raises(cfglib.ConfigError, match="^expiry_threshold_kind: "):
        cfglib.build(LatentRunConfig, [{"expiry_threshold_kind": "percent", "expiry_mode": "fixed"}])
