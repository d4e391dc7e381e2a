"""EnCodec's multi-scale STFT (MS-STFT) discriminator and the adversarial losses EnCodec trains with.

Behaviour follows the reference in encodec 0.1.1 (`encodec/msstftd.py`); the code and names are our own and the
state dict is not interchangeable with encodec's. Each sub-discriminator takes the complex STFT of the waveform
at one resolution (real and imaginary parts as two channels, no magnitude), runs a 2D conv stack (dilated in
time, strided in frequency, weight-normed, LeakyReLU 0.2), and returns a logit map plus the activations of every
hidden layer for the feature-matching loss.

Losses (EnCodec paper, sec. 3.4; hinge form):
    generator      L_g    = 1/K sum_k mean(relu(1 - D_k(x_hat)))
    discriminator  L_d    = 1/K sum_k [mean(relu(1 - D_k(x))) + mean(relu(1 + D_k(x_hat)))]
    feature match  L_feat = 1/K sum_k 1/L sum_l mean|D_k^l(x) - D_k^l(x_hat)| / mean|D_k^l(x)|
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

FeatureMaps = list[torch.Tensor]
DiscriminatorOutput = tuple[list[torch.Tensor], list[FeatureMaps]]


def _same_padding(kernel: tuple[int, int], dilation: tuple[int, int] = (1, 1)) -> tuple[int, int]:
    """Padding that keeps an (odd) kernel's output the size of its input at stride 1."""
    return tuple((k - 1) * d // 2 for k, d in zip(kernel, dilation))


def _conv(in_ch: int, out_ch: int, kernel: tuple[int, int], *, stride: tuple[int, int] = (1, 1),
          dilation: tuple[int, int] = (1, 1), normed: bool = True) -> nn.Module:
    conv = nn.Conv2d(in_ch, out_ch, kernel, stride=stride, dilation=dilation, padding=_same_padding(kernel, dilation))
    return weight_norm(conv) if normed else conv


class STFTDiscriminator(nn.Module):
    """One MS-STFT scale: complex STFT -> conv stack -> logit map.

    Layers (C = filters, all "same"-padded, frames x bins layout):
        in    (kernel_size)                          2*in_channels -> C
        mid_i (kernel_size, stride, dilation (d_i,1)) C -> C          for d_i in dilations
        out   (k0 x k0)                              C -> C
        post  (k0 x k0)                              C -> out_channels   (no activation; the logit)
    Feature maps are the activations after `in`, every `mid_i` and `out` (2 + len(dilations) of them).

    `weight_norm_first=False` reproduces a quirk of the encodec reference: its first conv is built without the
    `norm` argument and so carries no weight norm; every other conv does.
    """

    def __init__(self, filters: int = 32, in_channels: int = 1, out_channels: int = 1, n_fft: int = 1024,
                 hop_length: int = 256, win_length: int = 1024, kernel_size: tuple[int, int] = (3, 9),
                 stride: tuple[int, int] = (1, 2), dilations: Sequence[int] = (1, 2, 4), normalized: bool = True,
                 negative_slope: float = 0.2, weight_norm_first: bool = False):
        super().__init__()
        self.n_fft, self.hop_length, self.win_length = n_fft, hop_length, win_length
        self.normalized = normalized
        # Hann window (periodic, as torch.hann_window); not saved, but follows .to(device).
        self.register_buffer("window", torch.hann_window(win_length), persistent=False)
        square = (kernel_size[0], kernel_size[0])
        self.convs = nn.ModuleList([_conv(2 * in_channels, filters, kernel_size, normed=weight_norm_first)])
        for d in dilations:
            self.convs.append(_conv(filters, filters, kernel_size, stride=stride, dilation=(d, 1)))
        self.convs.append(_conv(filters, filters, square))
        self.post = _conv(filters, out_channels, square)
        self.act = nn.LeakyReLU(negative_slope)

    def spectrogram(self, wav: torch.Tensor) -> torch.Tensor:
        """[B, C, T] -> [B, 2C, frames, bins]: real parts of the C channels, then their imaginary parts.

        No centring/padding (frames = (T - n_fft) // hop + 1); with `normalized`, divided by the window's L2 norm
        (torchaudio's `normalized=True`). Computed in float32 whatever the autocast state."""
        b, c, t = wav.shape
        with torch.autocast(wav.device.type, enabled=False):
            spec = torch.stft(wav.reshape(b * c, t).float(), self.n_fft, hop_length=self.hop_length,
                              win_length=self.win_length, window=self.window, center=False, return_complex=True)
            if self.normalized:
                spec = spec / self.window.pow(2).sum().sqrt()
        spec = spec.reshape(b, c, *spec.shape[-2:])  # [B, C, bins, frames]
        return torch.cat([spec.real, spec.imag], dim=1).transpose(-1, -2)  # [B, 2C, frames, bins]

    def forward(self, wav: torch.Tensor) -> tuple[torch.Tensor, FeatureMaps]:
        """[B, C, T] -> (logits [B, out_channels, frames, bins'], feature maps [B, filters, frames, *])."""
        z = self.spectrogram(wav)
        fmaps = []
        for conv in self.convs:
            z = self.act(conv(z))
            fmaps.append(z)
        return self.post(z), fmaps


class MultiScaleSTFTDiscriminator(nn.Module):
    """EnCodec's MS-STFT discriminator: one `STFTDiscriminator` per (n_fft, hop, window) resolution.

    For 1 s at 24 kHz and the defaults, scale (1024, 256) gives logits [B, 1, 90, 65] and feature maps
    [B, 32, 90, 513 | 257 | 129 | 65 | 65]; (2048, 512) [B, 1, 43, 129]; (512, 128) [B, 1, 184, 33].
    """

    def __init__(self, filters: int = 32, n_ffts: Sequence[int] = (1024, 2048, 512),
                 hop_lengths: Sequence[int] = (256, 512, 128), win_lengths: Sequence[int] = (1024, 2048, 512),
                 in_channels: int = 1, out_channels: int = 1, **scale_kwargs):
        super().__init__()
        if not len(n_ffts) == len(hop_lengths) == len(win_lengths):
            raise ValueError(f"n_ffts, hop_lengths and win_lengths differ in length: {n_ffts}, {hop_lengths}, "
                             f"{win_lengths}")
        self.scales = nn.ModuleList(
            STFTDiscriminator(filters, in_channels, out_channels, n_fft=n, hop_length=h, win_length=w, **scale_kwargs)
            for n, h, w in zip(n_ffts, hop_lengths, win_lengths)
        )

    def __len__(self) -> int:
        return len(self.scales)

    def forward(self, wav: torch.Tensor) -> DiscriminatorOutput:
        """wav [B, C, T] -> (logits: one per scale, feature maps: one list per scale)."""
        logits, fmaps = [], []
        for scale in self.scales:
            logit, fmap = scale(wav)
            logits.append(logit)
            fmaps.append(fmap)
        return logits, fmaps


# ------------------------------------------------------------------------------------------------ losses


def adversarial_g_loss(logits_fake: Sequence[torch.Tensor]) -> torch.Tensor:
    """Generator hinge loss: mean over scales of mean(relu(1 - D_k(x_hat)))."""
    return torch.stack([torch.relu(1 - lf).mean() for lf in logits_fake]).mean()


def discriminator_loss(logits_real: Sequence[torch.Tensor], logits_fake: Sequence[torch.Tensor]) -> torch.Tensor:
    """Discriminator hinge loss: mean over scales of mean(relu(1 - D_k(x))) + mean(relu(1 + D_k(x_hat))).
    Pass logits of a *detached* fake so the codec gets no gradient from this loss."""
    if len(logits_real) != len(logits_fake):
        raise ValueError(f"{len(logits_real)} real vs {len(logits_fake)} fake logit maps")
    per_scale = [torch.relu(1 - lr).mean() + torch.relu(1 + lf).mean() for lr, lf in zip(logits_real, logits_fake)]
    return torch.stack(per_scale).mean()


def feature_matching_loss(fmaps_real: Sequence[FeatureMaps], fmaps_fake: Sequence[FeatureMaps],
                          eps: float = 1e-8) -> torch.Tensor:
    """EnCodec's relative L1 feature matching: mean over scales of the mean over layers of
    mean|f_real - f_fake| / mean|f_real|. Real maps are detached (targets); `eps` guards an all-zero map."""
    if len(fmaps_real) != len(fmaps_fake):
        raise ValueError(f"{len(fmaps_real)} real vs {len(fmaps_fake)} fake feature-map lists")
    per_scale = []
    for real, fake in zip(fmaps_real, fmaps_fake):
        if len(real) != len(fake):
            raise ValueError(f"{len(real)} real vs {len(fake)} fake feature maps in one scale")
        layers = []
        for fr, ff in zip(real, fake):
            fr = fr.detach()
            layers.append((fr - ff).abs().mean() / fr.abs().mean().clamp_min(eps))
        per_scale.append(torch.stack(layers).mean())
    return torch.stack(per_scale).mean()


@dataclass
class AdversarialLosses:
    """The codec's adversarial terms for one step: hinge `g_adv` and relative-L1 `feat`."""

    g_adv: torch.Tensor
    feat: torch.Tensor


def generator_losses(discriminator: MultiScaleSTFTDiscriminator, real: torch.Tensor,
                     fake: torch.Tensor) -> AdversarialLosses:
    """Adversarial terms for the codec's update: `fake` keeps its graph, `real` runs without one.
    Gradients also reach the discriminator's parameters; zero them (or freeze them) before its own step."""
    with torch.no_grad():
        _, fmaps_real = discriminator(real)
    logits_fake, fmaps_fake = discriminator(fake)
    return AdversarialLosses(adversarial_g_loss(logits_fake), feature_matching_loss(fmaps_real, fmaps_fake))


def discriminator_step_loss(discriminator: MultiScaleSTFTDiscriminator, real: torch.Tensor,
                            fake: torch.Tensor) -> torch.Tensor:
    """Hinge loss for the discriminator's update; `fake` is detached here."""
    logits_real, _ = discriminator(real)
    logits_fake, _ = discriminator(fake.detach())
    return discriminator_loss(logits_real, logits_fake)
