"""Reconstruction losses of the codec (EnCodec's, without the adversarial terms at CPU scale)."""

from __future__ import annotations

import warnings

import torch
import torchaudio
from torch import nn


class MultiScaleMelLoss(nn.Module):
    """Multi-scale mel loss over window sizes 2^5..2^11 (EnCodec's scales; hop = window / 4, 64 bands):
    mean over scales of L1 between mel magnitudes plus L1 between log10 mels (DAC's form of the second
    term, in place of EnCodec's L2 on magnitudes, which the loudest bins dominate).
    At small windows some low bands cover no FFT bin and stay zero on both sides, adding nothing
    (torchaudio warns about it; we silence that)."""

    def __init__(self, sample_rate: int = 24_000, scales: tuple[int, ...] = tuple(range(5, 12)), n_mels: int = 64):
        super().__init__()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="At least one mel filterbank has all zero values")
            self.mels = self._make(sample_rate, scales, n_mels)

    @staticmethod
    def _make(sample_rate: int, scales: tuple[int, ...], n_mels: int) -> nn.ModuleList:
        return nn.ModuleList(
            torchaudio.transforms.MelSpectrogram(
                sample_rate=sample_rate, n_fft=2**i, win_length=2**i, hop_length=2**i // 4,
                n_mels=n_mels, power=1.0, normalized=False, center=True, pad_mode="reflect",
            )
            for i in scales
        )

    def forward(self, estimate: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        total = estimate.new_zeros(())
        for mel in self.mels:
            s_est, s_ref = mel(estimate.float()), mel(reference.float())
            log_diff = torch.log10(s_est.clamp_min(1e-5)) - torch.log10(s_ref.clamp_min(1e-5))
            total = total + (s_est - s_ref).abs().mean() + log_diff.abs().mean()
        return total / len(self.mels)
