"""DAC's factorized residual VQ (`quantizer: dac`): codebooks learned by gradient, with no EMA, k-means or expiry.

Written here from the DAC paper (Kumar et al. 2023, arXiv:2306.06546, section 3.2 and its appendix) and the
description of descript-audio-codec's quantizer in the study's anchors. Per level i, on the residual r_i [B, D, T]:

    z_e  = in_proj(r_i)                       weight-normed 1x1 conv, D -> d (codebook_dim, 8)   [B, d, T]
    code = argmax_k cos(z_e[:, t], e_k)       nearest code by cosine: both sides L2-normalised    [B, T]
    z_q  = e_code                             the code's vector, *not* normalised                 [B, d, T]
    codebook loss   = MSE(z_q, sg(z_e))       the only gradient the codebook gets
    commitment loss = MSE(z_e, sg(z_q))       the in-projection's (and through it the encoder's)
    out_i = out_proj(z_e + sg(z_q - z_e))     straight-through, weight-normed 1x1 conv d -> D    [B, D, T]
    r_{i+1} = r_i - out_i                     the residual is not detached (as DAC)

quantized = sum of out_i; penalty = 1.0 x codebook loss + 0.25 x commitment loss, summed over the levels used (DAC's
weights and sum; the losses are on the unnormalised vectors, as DAC computes them: its issue #114 notes that the
paper's appendix normalises them). The straight-through value is written z_q + (z_e - sg(z_e)): the same gradient,
and a value exactly z_q, so a forward's residuals and output equal `encode` / `decode`'s bit for bit.

Quantizer dropout. DAC gives a fraction (0.5) of the items of a batch a number of levels drawn uniformly in 1..N.
Here the levels are drawn as the other arms draw them: the training loop picks one target bandwidth per batch
(EnCodec's 1.5 to 24 kbps), which sets the levels by EnCodec's rule (`LevelSchedule`), and `quantizer_dropout`
(off in the study, as for the other arms) draws uniformly below that, one draw per batch from `generator`.

Initialisation (`init`). "dac": DAC's, PyTorch's default projections and an N(0, 1) codebook. "unit_gain" (the cpu
presets' codec init, `CodecConfig.init`): a fresh quantizer passes its input through, as the unit-gain encoder and
decoder do and as the other arms' k-means on the first batch does. in_proj's rows are orthonormal and out_proj is
their transpose (zero biases), so out_proj . in_proj is an orthogonal projection onto d of the D dimensions; and at a
level's first training forward its codebook, N(0, 1) directions kept, is scaled by one number so that its RMS is the
projected residual's (all-reduced across ranks). Why (results/README.md section 11): with DAC's init on the cpu recipe
out_proj . in_proj is a random map, |code| ~ 2.8 against |z_e| ~ 0.3, the decoder's first outputs are far too loud
(mel loss 22 at step 5 against 4), and within 100 steps the encoder's latents turn to one direction (cosine to their
mean 0.27 -> 0.95 at step 50 -> 1.00) and every frame picks one code per level: the codec never leaves the plateau
(-50 dB), also with no penalty at all, a codebook drawn from the data, DAC's raw loss sum or lr 1e-4
(`benchmarks/probe_dac_init.py`). Either half alone still fails; both together learn (3 seeds off the plateau by
step 200, 139-386 distinct level-0 codes over the first 100 steps). Adam moves a code by about lr a step, so a
codebook 10x off the latents' scale cannot follow them in 500 steps (DAC trains 400k).

Dead codes are reported, never acted on: each level keeps a `CodeUsage` (EMA of per-code batch counts, decay 0.99,
threshold 2) that only `dead_mask()` reads. No tensor of the quantizer is written in place by a training forward
except that reporting EMA (and, with init "unit_gain", the codebook's one scaling at its level's first training
forward); the codebook changes only through the optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from studylib.core import distributed
from studylib.core.config import check_choice
from studylib.quantizers.base import (
    CodeUsage,
    LevelSchedule,
    QuantizedResult,
    ReportsUsage,
    codebook_metrics,
    drawn_from,
    nominal_kbps,
)


@dataclass
class LevelOutput:
    """One level's forward: its output, codes and its two losses (kept apart so each gradient can be checked)."""

    quantized: torch.Tensor  # [B, D, T]
    codes: torch.Tensor  # [B, T]
    codebook_loss: torch.Tensor  # MSE(z_q, sg(z_e)), scalar
    commitment_loss: torch.Tensor  # MSE(z_e, sg(z_q)), scalar


class FactorizedVQ(ReportsUsage, nn.Module):
    """One DAC level: in_proj (D -> d), a codebook `nn.Embedding(bins, d)` searched by cosine, out_proj (d -> D)."""

    def __init__(self, dimension: int, bins: int, codebook_dim: int, decay: float = 0.99, threshold: float = 2.0,
                 init: str = "dac"):
        super().__init__()
        self.in_proj = weight_norm(nn.Conv1d(dimension, codebook_dim, 1))
        self.out_proj = weight_norm(nn.Conv1d(codebook_dim, dimension, 1))
        self.codebook = nn.Embedding(bins, codebook_dim)
        self.usage = CodeUsage(bins, decay, threshold)
        # False until the codebook is scaled to the latents (init "unit_gain"); kept in checkpoints so a resumed
        # run does not scale it again
        self.register_buffer("inited", torch.tensor([init == "dac"]))
        if init == "unit_gain":
            self._orthogonal_projections_()

    @torch.no_grad()
    def _orthogonal_projections_(self) -> None:
        """in_proj's rows orthonormal, out_proj their transpose, zero biases: out_proj . in_proj = Q Q^T."""
        q, _ = torch.linalg.qr(torch.randn(self.in_proj.in_channels, self.in_proj.out_channels))  # [D, d]
        for conv, weight in ((self.in_proj, q.t()), (self.out_proj, q)):
            kernel = weight.unsqueeze(-1)  # [C_out, C_in, 1]
            conv.parametrizations.weight.original0.copy_(kernel.norm(dim=(1, 2), keepdim=True))
            conv.parametrizations.weight.original1.copy_(kernel)
            conv.bias.zero_()

    @torch.no_grad()
    def _scale_codebook_(self, z_e: torch.Tensor) -> None:
        """Scale the codebook so its RMS is z_e's [B, d, T] (mean squares summed over ranks): one number."""
        stats = torch.stack([z_e.float().square().mean(), z_e.new_ones((), dtype=torch.float32)])
        distributed.all_reduce_sum_(stats)
        self.codebook.weight.mul_((stats[0] / stats[1]).sqrt() / self.codebook.weight.square().mean().sqrt())
        self.inited.fill_(True)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints from before `inited` existed were all trained with DAC's init: nothing left to scale
        state_dict.setdefault(prefix + "inited", torch.tensor([True]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def code_vectors(self) -> torch.Tensor:
        return self.codebook.weight  # [K, d]

    def nearest(self, z_e: torch.Tensor) -> torch.Tensor:
        """Code of highest cosine similarity for each frame of z_e [B, d, T] -> [B, T]."""
        frames = F.normalize(z_e.transpose(1, 2), dim=-1)  # [B, T, d]
        return (frames @ F.normalize(self.codebook.weight, dim=-1).t()).argmax(dim=-1)  # [B, T, K] -> [B, T]

    def encode(self, residual: torch.Tensor) -> torch.Tensor:
        """residual [B, D, T] -> codes [B, T]."""
        return self.nearest(self.in_proj(residual))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, T] -> [B, D, T]."""
        return self.out_proj(self.codebook(codes).transpose(1, 2))

    def forward(self, residual: torch.Tensor) -> LevelOutput:
        z_e = self.in_proj(residual)  # [B, d, T]
        if self.training and not self.inited:
            self._scale_codebook_(z_e.detach())
        codes = self.nearest(z_e.detach())
        z_q = self.codebook(codes).transpose(1, 2)  # [B, d, T]
        codebook_loss = F.mse_loss(z_q, z_e.detach())
        commitment_loss = F.mse_loss(z_e, z_q.detach())
        straight_through = z_q.detach() + (z_e - z_e.detach())  # value z_q exactly, gradient to z_e
        if self.training:
            self.usage.update(codes)
        return LevelOutput(self.out_proj(straight_through), codes, codebook_loss, commitment_loss)


class FactorizedResidualVQ(LevelSchedule, nn.Module):
    """DAC's residual VQ with the interface of `studylib.quantizers.ema.ResidualVectorQuantizer`: x [B, D, T] in,
    `QuantizedResult` out; `layers[i]` is level i (`in_proj`, `codebook`, `out_proj`).

    `generator` seeds the initial parameters (see `drawn_from`: the codec's decoder starts as in the other arms)
    and the quantizer-dropout draws. `decay` and `threshold` define the reported dead codes only. `init`: "dac"
    (DAC's) or "unit_gain" (a fresh quantizer passes its input through; module docstring).
    """

    INITS = ("dac", "unit_gain")

    def __init__(
        self,
        dimension: int = 128,
        n_q: int = 32,
        bins: int = 1024,
        codebook_dim: int = 8,
        quantizer_dropout: bool = False,
        generator: torch.Generator | None = None,
        codebook_weight: float = 1.0,
        commitment_weight: float = 0.25,
        decay: float = 0.99,
        threshold: float = 2.0,
        init: str = "dac",
    ):
        super().__init__()
        check_choice("init", init, self.INITS)
        for name, value in (("dimension", dimension), ("n_q", n_q), ("bins", bins), ("codebook_dim", codebook_dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: got {value!r}, allowed an integer >= 1")
        if init == "unit_gain" and codebook_dim > dimension:
            raise ValueError(f"codebook_dim: got {codebook_dim} > dimension {dimension}, allowed <= dimension with "
                             f"init 'unit_gain' (an orthogonal projection onto codebook_dim of the dimensions)")
        self.dimension, self.n_q, self.bins, self.codebook_dim = dimension, n_q, bins, codebook_dim
        self.quantizer_dropout, self.generator = quantizer_dropout, generator
        self.codebook_weight, self.commitment_weight = codebook_weight, commitment_weight
        with drawn_from(generator):
            self.layers = nn.ModuleList(FactorizedVQ(dimension, bins, codebook_dim, decay, threshold, init)
                                        for _ in range(n_q))

    @property
    def codebooks(self) -> list[FactorizedVQ]:
        """The levels: what the training loop reads of a codebook (`dead_mask()`, replaced_total, embed)."""
        return list(self.layers)

    def forward(self, x: torch.Tensor, frame_rate: float, bandwidth: float | None = None) -> QuantizedResult:
        n_q = self.levels_for_step(frame_rate, bandwidth)
        quantized_out, residual = torch.zeros_like(x), x
        codes, penalty = [], x.new_zeros(())
        for layer in self.layers[:n_q]:
            out = layer(residual)
            residual = residual - out.quantized
            quantized_out = quantized_out + out.quantized
            codes.append(out.codes)
            penalty = penalty + self.codebook_weight * out.codebook_loss + self.commitment_weight * out.commitment_loss
        codes_t = torch.stack(codes)  # [n_q, B, T]
        metrics = {}
        if self.training:
            nothing_replaced = [cb.replaced_total for cb in self.codebooks[:n_q]]
            metrics = codebook_metrics(self.codebooks, codes_t, self.bins, nothing_replaced)
        bw = torch.tensor(nominal_kbps(n_q, self.bins, frame_rate)).to(x)
        return QuantizedResult(quantized_out, codes_t, bw, penalty=penalty if self.training else x.new_zeros(()),
                               metrics=metrics)

    @torch.no_grad()
    def encode(self, x: torch.Tensor, frame_rate: float, bandwidth: float | None = None) -> torch.Tensor:
        """x [B, D, T] -> codes [n_q, B, T]."""
        residual, codes = x, []
        for layer in self.layers[: self.get_num_quantizers_for_bandwidth(frame_rate, bandwidth)]:
            indices = layer.encode(residual)
            residual = residual - layer.decode(indices)
            codes.append(indices)
        return torch.stack(codes)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [n_q, B, T] -> quantized [B, D, T]."""
        return sum(layer.decode(indices) for layer, indices in zip(self.layers, codes))
