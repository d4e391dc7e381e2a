"""Evaluation metrics: SI-SDR, DAC's mel distance, ViSQOL, bitrates and codebook utilization.

Audio metrics take ``estimate`` (the codec's output) and ``reference`` (its input), [..., T] at one sample rate,
and return one value per item so that results can be tabulated per file and aggregated afterwards. Codebook
metrics take codes [n_q, ...] (level first, as `QuantizedResult.codes` [n_q, B, T]); every trailing axis is
pooled, so the codes of a whole evaluated set can be concatenated along the last axis and passed at once.
Each function's docstring states its definition. Sources: SI-SDR, Le Roux et al. 2019, "SDR - half-baked or
well done?" (arXiv:1811.02508); mel distance and bitrate efficiency, DAC (Kumar et al. 2023, arXiv:2306.06546,
https://github.com/descriptinc/descript-audio-codec); ViSQOL v3, Chinen et al. 2020 (arXiv:2004.09584).
"""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import pandas as pd
import soxr
import torch
import torchaudio

from studylib.model.codec import SAMPLE_RATE
from studylib.quantizers.base import nominal_kbps as nominal_kbps  # bitrates: defined with the quantizer

VISQOL_RATES = {"audio": 48_000, "speech": 16_000}  # ViSQOL v3's own rates; scores differ between modes

# DAC's mel loss as trained (descript-audio-codec conf/base.yml on top of dac/nn/loss.py MelSpectrogramLoss).
MEL_WINDOWS = (32, 64, 128, 256, 512, 1024, 2048)
MEL_BANDS = (5, 10, 20, 40, 80, 160, 320)
MEL_CLAMP = 1e-5


# ------------------------------------------------------------------------------------------- audio


def _check_pair(estimate: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    estimate, reference = torch.as_tensor(estimate), torch.as_tensor(reference)
    if estimate.shape != reference.shape:
        raise ValueError(f"estimate {tuple(estimate.shape)} and reference {tuple(reference.shape)} differ in shape")
    if estimate.ndim == 0 or estimate.shape[-1] == 0:
        raise ValueError(f"expected audio [..., T] with T > 0, got shape {tuple(estimate.shape)}")
    return estimate, reference


def si_sdr(estimate: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Scale-invariant SDR in dB (Le Roux et al. 2019), [..., T] -> [...].

    Both signals are made zero-mean; alpha = <est, ref> / ||ref||^2; 10 log10(||alpha ref||^2 / ||alpha ref - est||^2).
    The eps of the input dtype is added to every inner product, as torchmetrics does, so silence gives a finite
    number (0 dB for two silent signals) instead of NaN. Computed in float64, returned in the input's float dtype.
    """
    estimate, reference = _check_pair(estimate, reference)
    dtype = estimate.dtype if estimate.is_floating_point() else torch.float32
    eps = torch.finfo(dtype).eps
    est = estimate.double() - estimate.double().mean(-1, keepdim=True)
    ref = reference.double() - reference.double().mean(-1, keepdim=True)
    alpha = ((est * ref).sum(-1, keepdim=True) + eps) / (ref.pow(2).sum(-1, keepdim=True) + eps)
    target = alpha * ref
    ratio = (target.pow(2).sum(-1) + eps) / ((target - est).pow(2).sum(-1) + eps)
    return (10 * torch.log10(ratio)).to(dtype)


# sub-bands of `band_si_sdr` (Hz): where the energy of speech and music sits (below 1 kHz), the band a small
# codec still passes (1-4 kHz), and the one it drops first (4-12 kHz)
BANDS = ((0.0, 1000.0), (1000.0, 4000.0), (4000.0, 12000.0))


def band_si_sdr(estimate: torch.Tensor, reference: torch.Tensor, sample_rate: int = SAMPLE_RATE,
                bands: tuple[tuple[float, float], ...] = BANDS) -> pd.DataFrame:
    """SI-SDR (dB) of each item [B, T] after an ideal band-pass of both signals (FFT mask), per band, the
    reference's share of energy in it and the estimate's energy there relative to the reference's: a waveform error
    concentrated in one band shows as a low SI-SDR there, and the energy ratio tells a band that is missing (ratio
    near 0) from one that is present with the wrong waveform (ratio near 1, SI-SDR far below 0)."""

    spec_e, spec_r = torch.fft.rfft(estimate.double()), torch.fft.rfft(reference.double())
    freqs = torch.fft.rfftfreq(reference.shape[-1], 1 / sample_rate)
    total = spec_r.abs().pow(2).sum(-1)
    rows = []
    for low, high in bands:
        mask = (freqs >= low) & (freqs < high)
        e = torch.fft.irfft(spec_e * mask, reference.shape[-1])
        r = torch.fft.irfft(spec_r * mask, reference.shape[-1])
        band_r = (spec_r.abs().pow(2) * mask).sum(-1)
        ratio = (spec_e.abs().pow(2) * mask).sum(-1) / band_r
        for i, (s, sh, er) in enumerate(zip(si_sdr(e, r), band_r / total, ratio)):
            rows.append({"item_pos": i, "band": f"{low / 1000:g}-{high / 1000:g} kHz", "si_sdr": float(s),
                         "energy_share": float(sh), "energy_ratio": float(er)})
    return pd.DataFrame(rows)


@functools.lru_cache(maxsize=32)
def _mel_filters(n_fft: int, n_mels: int, sample_rate: int) -> torch.Tensor:
    """librosa's default mel filters (Slaney scale and area norm, 0 Hz to Nyquist) as [n_fft // 2 + 1, n_mels]."""
    with warnings.catch_warnings():  # some rates have empty bands (16 kHz, window 32): 0 in both inputs, as in DAC
        warnings.simplefilter("ignore")
        return torchaudio.functional.melscale_fbanks(
            n_fft // 2 + 1, 0.0, sample_rate / 2, n_mels, sample_rate, norm="slaney", mel_scale="slaney"
        ).double()


def mel_distance(estimate: torch.Tensor, reference: torch.Tensor, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """DAC's multi-scale mel distance, [..., T] -> [...] (lower is better; 0 for identical signals).

    Exactly the mel term DAC trains with: `MelSpectrogramLoss` with conf/base.yml's settings, window lengths
    (32, 64, 128, 256, 512, 1024, 2048) with n_mels (5, 10, 20, 40, 80, 160, 320), hop = window // 4, periodic
    Hann window, centred STFT with reflect padding, magnitude (pow 1.0), librosa mel filters (Slaney, 0 Hz to
    Nyquist), clamp 1e-5, log10, L1 mean per scale, summed over the 7 scales; log_weight 1.0 and mag_weight 0.0
    (no linear-magnitude term). Per item: the mean of this over a batch of equal-length items is DAC's loss value.
    Needs T > 1024 (the largest window's reflect padding).
    """
    estimate, reference = _check_pair(estimate, reference)
    length = estimate.shape[-1]
    if length <= max(MEL_WINDOWS) // 2:
        raise ValueError(f"mel_distance needs more than {max(MEL_WINDOWS) // 2} samples, got {length}")
    dtype = estimate.dtype if estimate.is_floating_point() else torch.float32
    lead = estimate.shape[:-1]
    est, ref = (x.reshape(-1, length).double() for x in (estimate, reference))  # [N, T]
    total = est.new_zeros(est.shape[0])
    for window, n_mels in zip(MEL_WINDOWS, MEL_BANDS):
        hann = torch.hann_window(window, dtype=est.dtype, device=est.device)
        filters = _mel_filters(window, n_mels, sample_rate).to(est.device)  # [F, M]
        log_est, log_ref = (
            (torch.stft(x, window, window // 4, window=hann, center=True, pad_mode="reflect", return_complex=True)
             .abs().transpose(1, 2) @ filters).clamp(min=MEL_CLAMP).log10()  # [N, frames, M]
            for x in (est, ref)
        )
        total += (log_est - log_ref).abs().mean(dim=(1, 2))
    return total.reshape(lead).to(dtype)


def _require_visqol():
    try:
        from visqol import VisqolApi
    except ImportError as error:
        raise RuntimeError("visqol needs the visqol-python package: pip install visqol-python") from error
    return VisqolApi


@functools.lru_cache(maxsize=2)
def _visqol_api(api_class: type, mode: str):
    api = api_class()
    # Speech mode: the polynomial similarity-to-MOS mapping, fixed so that scores do not depend on whether the
    # optional lattice runtime (ai-edge-litert, C++ ViSQOL's default mapper) happens to be installed.
    if mode == "speech":
        api.create(mode=mode, use_lattice_model=False)
    else:
        api.create(mode=mode)
    return api


def visqol(estimate: torch.Tensor | np.ndarray, reference: torch.Tensor | np.ndarray, sample_rate: int,
           mode: str = "audio") -> float:
    """ViSQOL v3 MOS-LQO of a mono item [T] (pure-Python port, `visqol-python`).

    Both signals are resampled (soxr) to the mode's rate: 48 kHz for ``audio`` (scores up to about 4.75), 16 kHz
    for ``speech`` (polynomial mapping, up to 5.0). The two modes are not comparable. Raises RuntimeError if
    visqol-python is missing rather than returning NaN. Cost on a 2-core CPU, audio mode: about 4 s for a 5 s item
    and 10 s for a 10 s item (speech mode: half that); with numba installed (``pip install numba``, same scores)
    under 1 s, after a one-time JIT compile.
    """
    if mode not in VISQOL_RATES:
        raise ValueError(f"mode: got {mode!r}, allowed {tuple(VISQOL_RATES)}")
    estimate, reference = _check_pair(estimate, reference)
    if estimate.ndim != 1:
        raise ValueError(f"visqol scores one mono item [T], got shape {tuple(estimate.shape)}")
    api = _visqol_api(_require_visqol(), mode)  # imported on every call: a missing package always raises
    rate = VISQOL_RATES[mode]
    ref, est = (soxr.resample(x.detach().cpu().double().numpy(), sample_rate, rate) for x in (reference, estimate))
    return float(api.measure_from_arrays(ref, est, rate).moslqo)


# ---------------------------------------------------------------------------------------- bitrates


def _flat_codes(codes: torch.Tensor, bins: int) -> torch.Tensor:
    """codes [n_q, ...] -> [n_q, N], checked to be integers in [0, bins)."""
    codes = torch.as_tensor(codes)
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
    if codes.ndim < 2 or codes.numel() == 0:
        raise ValueError(f"codes must be [n_q, ...] with at least one code per level, got shape {tuple(codes.shape)}")
    flat = codes.reshape(codes.shape[0], -1).long()
    if flat.min() < 0 or flat.max() >= bins:
        raise ValueError(f"codes must lie in [0, {bins}), got [{int(flat.min())}, {int(flat.max())}]")
    return flat


def code_histogram(codes: torch.Tensor, bins: int) -> torch.Tensor:
    """How often each code was chosen at each level: codes [n_q, ...] -> counts [n_q, bins] (int64)."""
    flat = _flat_codes(codes, bins)
    offsets = torch.arange(flat.shape[0], device=flat.device)[:, None] * bins
    return torch.bincount((flat + offsets).reshape(-1), minlength=flat.shape[0] * bins).reshape(-1, bins)


def sorted_frequency(codes: torch.Tensor, bins: int) -> torch.Tensor:
    """Each level's code frequencies, sorted descending and summing to 1: [n_q, bins] (a codes-by-rank plot)."""
    counts = code_histogram(codes, bins).double()
    return (counts / counts.sum(1, keepdim=True)).sort(dim=1, descending=True).values


def _entropy_bits(counts: torch.Tensor) -> torch.Tensor:
    """Empirical entropy in bits of each row of counts [n_q, bins] -> [n_q]."""
    p = counts.double() / counts.sum(1, keepdim=True)
    return -torch.where(p > 0, p * p.log2(), 0.0).sum(1)


def entropy_kbps(codes: torch.Tensor, bins: int, frame_rate: float) -> float:
    """Bitrate an ideal per-level entropy coder would reach on this set: frame_rate x sum of level entropies / 1000.

    Levels are coded independently (no context), as in DAC's scripts/compute_entropy.py.
    """
    return frame_rate * float(_entropy_bits(code_histogram(codes, bins)).sum()) / 1000


def bitrate_efficiency(codes: torch.Tensor, bins: int) -> float:
    """entropy_kbps / nominal_kbps (DAC's "bitrate efficiency"): 1.0 when every level uses its codes uniformly."""
    counts = code_histogram(codes, bins)
    return float(_entropy_bits(counts).sum()) / (counts.shape[0] * math.log2(bins))


# ------------------------------------------------------------------------------------- utilization


def utilization(codes: torch.Tensor, bins: int, dead_mask: torch.Tensor | None = None) -> pd.DataFrame:
    """Per-level codebook use on an evaluated set, one row per level.

    Columns: level; usage (fraction of the bins used at least once, FSQ's "codebook usage"); used (that count);
    perplexity (exp of the entropy in nats: the number of equally used codes with the same entropy);
    entropy_bits; entropy_norm (entropy_bits / log2(bins)); dead (codes flagged dead by the quantizer's own
    [n_q, bins] bool mask, e.g. EMA usage below the expiry threshold; NaN when no mask is given).
    """
    counts = code_histogram(codes, bins)  # [n_q, bins]
    n_q = counts.shape[0]
    if dead_mask is None:
        dead = np.full(n_q, np.nan)
    else:
        dead_mask = torch.as_tensor(dead_mask)
        if dead_mask.dtype != torch.bool or tuple(dead_mask.shape) != (n_q, bins):
            raise ValueError(f"dead_mask must be bool [{n_q}, {bins}], got {dead_mask.dtype} {tuple(dead_mask.shape)}")
        dead = dead_mask.sum(1).cpu().numpy().astype(float)
    used = (counts > 0).sum(1).cpu().numpy()
    entropy = _entropy_bits(counts).cpu().numpy()
    return pd.DataFrame({
        "level": np.arange(n_q),
        "usage": used / bins,
        "used": used,
        "perplexity": np.exp(entropy * math.log(2)),
        "entropy_bits": entropy,
        "entropy_norm": entropy / math.log2(bins),
        "dead": dead,
    })
