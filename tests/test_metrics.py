"""studylib.model.metrics and studylib.training.baselines against references, hand-computed values and their
invariances."""

from __future__ import annotations

import importlib.util
import math
import sys

import numpy as np
import pytest
import torch
from torchmetrics.functional.audio import scale_invariant_signal_distortion_ratio

from studylib.model import metrics
from studylib.training import baselines

SR = 24_000
HAS_VISQOL = importlib.util.find_spec("visqol") is not None


def speech_like(seconds: float, seed: int = 0) -> torch.Tensor:
    """[T] float64: a harmonic voice with vibrato and syllable-rate loudness, over a little noise."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * SR), dtype=torch.float64) / SR
    f0 = 140 * (1 + 0.05 * torch.sin(2 * math.pi * 3 * t))
    phase = 2 * math.pi * torch.cumsum(f0, 0) / SR
    voice = sum(torch.sin(k * phase) / k for k in range(1, 8)) * (0.5 + 0.5 * torch.sin(2 * math.pi * 1.5 * t) ** 2)
    return 0.2 * voice + 0.003 * torch.randn(t.shape, generator=g, dtype=torch.float64)


def noisy(x: torch.Tensor, level: float, seed: int = 1) -> torch.Tensor:
    return x + level * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)


# ------------------------------------------------------------------------------------------ SI-SDR


def test_si_sdr_matches_torchmetrics_on_random_signals():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(4, 3, 2000, generator=g, dtype=torch.float64)
    est = ref + torch.rand(4, 3, 1, generator=g, dtype=torch.float64) * torch.randn(4, 3, 2000, generator=g,
                                                                                       dtype=torch.float64)
    expected = scale_invariant_signal_distortion_ratio(est, ref, zero_mean=True)
    assert metrics.si_sdr(est, ref).shape == (4, 3)
    torch.testing.assert_close(metrics.si_sdr(est, ref), expected, rtol=1e-9, atol=1e-9)


def test_si_sdr_matches_torchmetrics_on_tones_with_noise_and_offset():
    ref = torch.stack([speech_like(1.0, seed) + 0.1 for seed in range(3)]).float()  # a DC offset: zero-mean matters
    est = torch.stack([0.7 * noisy(r.double(), level, seed).float() for seed, (r, level)
                       in enumerate(zip(ref, (0.001, 0.01, 0.1)))])
    expected = scale_invariant_signal_distortion_ratio(est, ref, zero_mean=True)
    got = metrics.si_sdr(est, ref)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert got[0] > got[1] > got[2]


def test_si_sdr_is_scale_invariant_and_finite_on_silence():
    ref = speech_like(0.5)
    est = noisy(ref, 0.05)
    base = metrics.si_sdr(est, ref)
    for scale in (1e-3, 0.5, 7.0, -2.0):
        torch.testing.assert_close(metrics.si_sdr(scale * est, ref), base)
    assert metrics.si_sdr(torch.zeros(100), torch.zeros(100)).item() == 0.0
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.si_sdr(torch.zeros(2, 100), torch.zeros(100))


# ----------------------------------------------------------------------------------- mel distance


def test_mel_distance_is_zero_for_identical_and_grows_with_noise():
    ref = speech_like(1.0)
    assert metrics.mel_distance(ref, ref).item() == 0.0
    distances = [metrics.mel_distance(noisy(ref, level), ref).item() for level in (1e-3, 1e-2, 1e-1)]
    assert 0 < distances[0] < distances[1] < distances[2]


def test_mel_distance_is_per_item_and_checks_length():
    ref = torch.stack([speech_like(0.5, 0), speech_like(0.5, 1)]).float()
    est = torch.stack([ref[0], noisy(ref[1].double(), 0.05).float()])
    got = metrics.mel_distance(est, ref)
    assert got.shape == (2,) and got.dtype == torch.float32
    assert got[0] == 0 and got[1] > 0
    torch.testing.assert_close(got[1], metrics.mel_distance(est[1], ref[1]))
    with pytest.raises(ValueError, match="more than 1024 samples"):
        metrics.mel_distance(torch.zeros(1024), torch.zeros(1024))


# ------------------------------------------------------------------------------------------ bitrates


def test_bitrates_hand_computed():
    assert metrics.nominal_kbps(8, 1024, 75) == 6.0
    assert metrics.nominal_kbps(32, 1024, 75) == 24.0
    uniform = torch.arange(1024).repeat(8, 3)  # [8, 3072]: every code three times at every level
    assert metrics.entropy_kbps(uniform, 1024, 75) == pytest.approx(6.0)
    assert metrics.bitrate_efficiency(uniform, 1024) == pytest.approx(1.0)
    constant = torch.full((8, 2, 50), 17)
    assert metrics.entropy_kbps(constant, 1024, 75) == 0.0
    assert metrics.bitrate_efficiency(constant, 1024) == 0.0
    half = torch.tensor([[0, 1, 2, 3], [0, 0, 0, 0]])  # level 0: 2 bits, level 1: 0 bits, of 2 x 2 possible
    assert metrics.entropy_kbps(half, 4, 75) == pytest.approx(0.15)
    assert metrics.bitrate_efficiency(half, 4) == pytest.approx(0.5)


def test_histogram_and_sorted_frequency():
    codes = torch.tensor([[[0, 0, 1], [1, 3, 0]], [[2, 2, 2], [2, 2, 1]]])  # [n_q=2, B=2, T=3]
    assert metrics.code_histogram(codes, 4).tolist() == [[3, 2, 0, 1], [0, 1, 5, 0]]
    freq = metrics.sorted_frequency(codes, 4)
    torch.testing.assert_close(freq, torch.tensor([[3, 2, 1, 0], [5, 1, 0, 0]], dtype=torch.float64) / 6)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        metrics.code_histogram(torch.tensor([[0, 4]]), 4)
    with pytest.raises(ValueError, match="integer"):
        metrics.code_histogram(torch.zeros(2, 3), 4)


def test_utilization_table():
    codes = torch.tensor([[0, 0, 1, 1], [3, 3, 3, 3], [0, 1, 2, 3]])  # [n_q=3, N=4], bins 8
    dead = torch.zeros(3, 8, dtype=torch.bool)
    dead[0, 2:] = True
    dead[1, :5] = True
    table = metrics.utilization(codes, 8, dead)
    assert list(table.columns) == ["level", "usage", "used", "perplexity", "entropy_bits", "entropy_norm", "dead"]
    assert table["level"].tolist() == [0, 1, 2]
    assert table["used"].tolist() == [2, 1, 4]
    assert table["usage"].tolist() == [0.25, 0.125, 0.5]
    np.testing.assert_allclose(table["entropy_bits"], [1.0, 0.0, 2.0], atol=1e-12)
    np.testing.assert_allclose(table["perplexity"], [2.0, 1.0, 4.0])
    np.testing.assert_allclose(table["entropy_norm"], [1 / 3, 0.0, 2 / 3])
    assert table["dead"].tolist() == [6.0, 5.0, 0.0]
    assert metrics.utilization(codes, 8)["dead"].isna().all()
    with pytest.raises(ValueError, match="dead_mask"):
        metrics.utilization(codes, 8, dead[:2])


# -------------------------------------------------------------------------------------------- ViSQOL


@pytest.mark.slow
@pytest.mark.skipif(not HAS_VISQOL, reason="visqol-python is not installed (pip install visqol-python)")
def test_visqol_audio_mode_ranks_a_noisy_copy_lower():
    ref = speech_like(3.0)
    clean = metrics.visqol(ref, ref, SR)
    degraded = metrics.visqol(noisy(ref, 0.02), ref, SR)
    assert clean >= 4.0
    assert degraded < clean - 0.5


@pytest.mark.skipif(not HAS_VISQOL, reason="visqol-python is not installed (pip install visqol-python)")
def test_visqol_speech_mode_ranks_a_noisy_copy_lower():
    ref = speech_like(3.0)
    assert metrics.visqol(noisy(ref, 0.02), ref, SR, mode="speech") < metrics.visqol(ref, ref, SR, mode="speech")


def test_visqol_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "visqol", None)  # makes `import visqol` raise ImportError
    with pytest.raises(RuntimeError, match="pip install visqol-python"):
        metrics.visqol(torch.zeros(SR), torch.zeros(SR), SR)


def test_visqol_checks_mode_and_shape():
    with pytest.raises(ValueError, match="mode"):
        metrics.visqol(torch.zeros(SR), torch.zeros(SR), SR, mode="music")
    with pytest.raises(ValueError, match="mono"):
        metrics.visqol(torch.zeros(2, SR), torch.zeros(2, SR), SR)


# ---------------------------------------------------------------------------------------------- Opus

needs_opus = pytest.mark.skipif(not baselines.opus_available(), reason=baselines.MISSING)


@needs_opus
def test_opus_roundtrip_preserves_length_and_improves_with_bitrate():
    ref = speech_like(2.0).float()
    sdr = {}
    for kbps in (6.0, 24.0):
        out = baselines.opus_roundtrip(ref, kbps)
        assert out.shape == ref.shape and out.dtype == np.float32
        sdr[kbps] = metrics.si_sdr(torch.from_numpy(out), ref).item()
    assert sdr[24.0] > sdr[6.0] + 5
    assert sdr[24.0] > 15  # sample-aligned: a pre-skip or delay error would drive this below 0 dB


@needs_opus
def test_opus_odd_lengths_and_reported_bitrate():
    ref = speech_like(1.1).numpy()
    for length in (1, 481, 24_001):
        assert baselines.opus_roundtrip(ref[:length], 12.0).shape == (length,)
    result = baselines.opus_encode_decode(ref, 24.0)
    assert 15 < result.payload_kbps < result.file_kbps
    with pytest.raises(ValueError, match="kbps"):
        baselines.opus_roundtrip(ref, 0.4)


def test_missing_opus_tools_names_the_package(monkeypatch):
    monkeypatch.setattr(baselines.shutil, "which", lambda tool: None)
    assert not baselines.opus_available()
    with pytest.raises(RuntimeError, match="apt-get install opus-tools"):
        baselines.require_opus()
    with pytest.raises(RuntimeError, match="apt-get install opus-tools"):
        baselines.opus_roundtrip(np.zeros(100), 6.0)


def test_band_si_sdr_finds_the_band_that_carries_the_error():
    sr, n = 24_000, 24_000
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(2, n, generator=g, dtype=torch.float64)
    spec = torch.fft.rfft(ref)
    freqs = torch.fft.rfftfreq(n, 1 / sr)
    noise = torch.fft.rfft(torch.randn(2, n, generator=g, dtype=torch.float64))
    est = torch.fft.irfft(torch.where(freqs < 1000, spec, noise), n)  # right below 1 kHz, noise above
    table = metrics.band_si_sdr(est, ref, sr).groupby("band").si_sdr.mean()
    assert table["0-1 kHz"] > 100 and table["1-4 kHz"] < 3 and table["4-12 kHz"] < 3
    shares = metrics.band_si_sdr(ref, ref, sr).groupby("item_pos").energy_share.sum()
    assert shares.tolist() == pytest.approx([1.0, 1.0], abs=1e-3)  # the bands cover 0-12 kHz
