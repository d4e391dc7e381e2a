"""The peer arms: lucidrains' vector-quantize-pytorch behind our quantizer's interface, `ResidualVQ` (vqtorch) and
SimVQ (simvq, below).

Why `ResidualVQ`: the study sets EnCodec's expiry (buggy and fixed, `studylib.quantizers.ema`) against an independent,
maintained implementation whose replacement survives the EMA by construction: its `replace` resets
``embed``, ``cluster_size`` and ``embed_avg`` together, after the EMA update. Everything else is held
equal to our codebook so that only the codebook dynamics differ: EMA codebooks (decay 0.99, epsilon
1e-5), k-means init on the first batch, plain straight-through gradients (the library's default rotation
trick is switched off), commitment weight 1.0, EnCodec's bandwidth -> levels rule and our metrics.

Running only the first n_q levels: `ResidualVQ` has no argument for it (its ``quantize_dropout`` picks a
random depth, in training only), so `PeerResidualVQ.forward` runs `ResidualVQ.forward`'s own per-level
loop over ``rvq.layers[:n_q]``: the same calls and arithmetic, without the beam search, masks and implicit
codebooks we do not use. tests/test_peer.py checks it matches `ResidualVQ.forward` when all levels run.

Residual gradient: ``detach_residual`` maps to the library's ``quant_grad_frac`` (False -> 1.0: EnCodec's
residual; True -> 0.0, the library default). With a detached residual every level's straight-through
output carries the encoder gradient, so the sum would pass n_q times the decoder's gradient to the
encoder; as in our RVQ, the output is then made straight-through as a whole.

Distributed: the library decides at construction (``sync_codebook`` = is_distributed()): counts and sums
are SUM-all-reduced, k-means and replacement frames are drawn across ranks.

The collapse-free peer (`quantizer: simvq`, `SimResidualVQ`): the library's SimVQ (Zhu et al. 2024,
arXiv:2411.02038), whose codes are a learned linear map W of a frozen Gaussian basis C (codes = C W^T, C of std
dim^-0.5): every gradient step on W moves every code, used or not, which is how it avoids collapse without EMA,
k-means or expiry. Losses per level: codebook MSE(sg(z), q) x 1.0 + commitment MSE(z, sg(q)) x 0.25 (the same
weights as DAC), averaged over the levels as our other arms average theirs; plain straight-through (the paper's;
the library's default rotation trick is switched off, as for the vqtorch peer), so the encoder's gradient is
the other arms'. Dead codes are reported from a `CodeUsage` EMA, as for `quantizer: dac`.

Why SimVQ and not FSQ (`ResidualFSQ`), the issue's other candidate:
* SimVQ works in the other arms' code space: per level 1024 codes of the full 128-dim residual, 10 whole bits,
  so "equal nominal bitrate" is exactly equal, and nearest code, straight-through and residual are ours; the one
  difference is how the codebook is parametrised, which is the mechanism the comparison is about.
* `ResidualFSQ` (1.32.0) projects the latent to len(levels) = 4 dims shared by every level and scales level i's
  grid by levels^-i: in float32 its residual stops shrinking after about 12 levels (measured on random latents,
  levels [8, 5, 5, 5]: RMS error 1.6e-6 after 8 levels, 3.3e-8 after 12, 16 or 32), so at 12 and 24 kbps its
  deeper levels quantize rounding error and the 24 kbps comparison would measure float32, not the design; and
  [8, 5, 5, 5] = 1000 codes is 9.97 bits a level, under the others' 10.
"""

from __future__ import annotations

import torch
from torch import nn
from vector_quantize_pytorch import ResidualSimVQ, ResidualVQ
from vector_quantize_pytorch.residual_vq import frac_gradient
from vector_quantize_pytorch.sim_vq import SimVQ
from vector_quantize_pytorch.vector_quantize_pytorch import Codebook

from studylib.quantizers.base import (
    CodeUsage,
    LevelSchedule,
    QuantizedResult,
    ReportsUsage,
    codebook_metrics,
    drawn_from,
    nominal_kbps,
)


class PeerCodebook(Codebook):
    """The library's codebook plus what our metrics and training loop read: `dead_mask()` and
    ``replaced_total`` (codes its expiry replaced so far; not in the state dict).

    `ResidualVQ` offers no hook for a codebook class, so `adopt` re-classes the codebooks it built: the
    library's code and buffers stay exactly its own.
    """

    replaced_total: torch.Tensor

    @classmethod
    def adopt(cls, codebook: Codebook) -> PeerCodebook:
        codebook.__class__ = cls
        codebook.register_buffer("replaced_total", torch.zeros((), dtype=torch.long), persistent=False)
        return codebook

    def dead_mask(self) -> torch.Tensor:
        """Codes whose EMA usage is below the library's ``threshold_ema_dead_code`` -> bool [K]."""
        return self.cluster_size[0] < self.threshold_ema_dead_code

    def replace(self, batch_samples: torch.Tensor, batch_mask: torch.Tensor, seq_mask=None) -> None:
        # With more dead codes than frames the library replaces only as many as it has frames, so count what
        # changed rather than the mask: a replaced code's usage goes from below the threshold to
        # reset_cluster_size (= the threshold).
        before = self.cluster_size.clone()
        super().replace(batch_samples, batch_mask, seq_mask)
        self.replaced_total += (self.cluster_size != before).sum()


class LibraryResidual(LevelSchedule, nn.Module):
    """What both peers share: `ResidualVQ.forward`'s per-level loop over the first n_q levels of ``self.rvq``
    (whose layers return (quantized, indices, loss), channel-last) and our metrics. Subclasses build ``rvq`` and
    say what `codebooks` are."""

    rvq: nn.Module
    detach_residual: bool

    @property
    def codebooks(self) -> list:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, frame_rate: float, bandwidth: float | None = None) -> QuantizedResult:
        n_q = self.levels_for_step(frame_rate, bandwidth)
        replaced_before = [cb.replaced_total.clone() for cb in self.codebooks[:n_q]] if self.training else []

        x_last = x.transpose(1, 2)  # [B, T, D]: the library is channel-last
        quantized_out, residual = torch.zeros_like(x_last), x_last
        codes, losses = [], []
        for layer in self.rvq.layers[:n_q]:  # ResidualVQ.forward's loop, first n_q levels
            quantized, indices, loss = layer(residual)
            residual = residual - frac_gradient(quantized, 0.0 if self.detach_residual else 1.0)
            quantized_out = quantized_out + quantized
            codes.append(indices)
            losses.append(loss)
        if self.training and self.detach_residual:
            quantized_out = x_last + (quantized_out - x_last).detach()

        codes_t = torch.stack(codes)  # [n_q, B, T]
        # Our metric code run on the library's codebooks, so every arm reports by the same definitions.
        metrics = codebook_metrics(self.codebooks, codes_t, self.bins, replaced_before) if self.training else {}
        bw = torch.tensor(nominal_kbps(n_q, self.bins, frame_rate)).to(x)
        return QuantizedResult(quantized_out.transpose(1, 2), codes_t, bw, penalty=torch.stack(losses).mean(),
                               metrics=metrics)


class PeerResidualVQ(LibraryResidual):
    """`vector_quantize_pytorch.ResidualVQ` (EMA, k-means init, its own expiry) with the interface of
    `studylib.quantizers.ema.ResidualVectorQuantizer`: x [B, D, T] in, `QuantizedResult` out.

    `generator` drives only the quantizer-dropout draw: the library takes its k-means seeds and
    replacement frames from torch's global RNG (see `resume_state`).
    """

    def __init__(
        self,
        dimension: int = 128,
        n_q: int = 32,
        bins: int = 1024,
        decay: float = 0.99,
        kmeans_init: bool = True,
        kmeans_iters: int = 50,
        threshold_ema_dead_code: float = 2.0,
        commitment_weight: float = 1.0,
        quantizer_dropout: bool = False,
        detach_residual: bool = False,
        generator: torch.Generator | None = None,
        epsilon: float = 1e-5,
    ):
        super().__init__()
        if not isinstance(n_q, int) or n_q < 1:
            raise ValueError(f"n_q: got {n_q!r}, allowed an integer >= 1")
        if not threshold_ema_dead_code >= 0:
            raise ValueError(f"threshold_ema_dead_code: got {threshold_ema_dead_code!r}, allowed a number >= 0")
        self.dimension, self.n_q, self.bins = dimension, n_q, bins
        self.quantizer_dropout, self.detach_residual = quantizer_dropout, detach_residual
        self.generator = generator
        self.rvq = ResidualVQ(
            dim=dimension, num_quantizers=n_q, codebook_size=bins, decay=decay, eps=epsilon,
            kmeans_init=kmeans_init, kmeans_iters=kmeans_iters, threshold_ema_dead_code=threshold_ema_dead_code,
            commitment_weight=commitment_weight, rotation_trick=False,
            quant_grad_frac=0.0 if detach_residual else 1.0,
        )
        for layer in self.rvq.layers:
            PeerCodebook.adopt(layer._codebook)

    @property
    def codebooks(self) -> list[PeerCodebook]:
        return [layer._codebook for layer in self.rvq.layers]

    @torch.no_grad()
    def encode(self, x: torch.Tensor, frame_rate: float, bandwidth: float | None = None) -> torch.Tensor:
        """x [B, D, T] -> codes [n_q, B, T], leaving the codebooks as they are."""
        residual, codes = x.transpose(1, 2), []
        for layer in self.rvq.layers[: self.get_num_quantizers_for_bandwidth(frame_rate, bandwidth)]:
            quantized, indices, _ = layer(residual, freeze_codebook=True)
            residual = residual - quantized
            codes.append(indices)
        return torch.stack(codes)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [n_q, B, T] -> quantized [B, D, T]."""
        out = sum(layer.get_output_from_indices(indices) for layer, indices in zip(self.rvq.layers, codes))
        return out.transpose(1, 2)

    def resume_state(self) -> dict:
        """What a checkpoint needs beyond state_dict() to resume exactly: the expiry counters, the dropout
        generator and torch's global RNG states, from which the library draws k-means seeds and replacements."""
        return {
            "counters": [cb.replaced_total.clone() for cb in self.codebooks],
            "generator": self.generator.get_state() if self.generator is not None else None,
            "cpu_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
        }

    def load_resume_state(self, state: dict) -> None:
        for cb, count in zip(self.codebooks, state["counters"], strict=True):
            cb.replaced_total.copy_(count)
        if self.generator is not None:
            self.generator.set_state(state["generator"])
        torch.set_rng_state(state["cpu_rng"])
        if state["cuda_rng"] is not None:
            torch.cuda.set_rng_state_all(state["cuda_rng"])


# ------------------------------------------------------------------------------ the collapse-free peer


class SimCodebook(ReportsUsage, SimVQ):
    """The library's SimVQ level plus a reporting `CodeUsage` (counted in training forwards only); `adopt`
    re-classes the levels `ResidualSimVQ` built, so the library's code and parameters stay its own."""

    @classmethod
    def adopt(cls, layer: SimVQ, decay: float, threshold: float) -> SimCodebook:
        layer.__class__ = cls
        layer.usage = CodeUsage(layer.codebook_size, decay, threshold)
        return layer

    def code_vectors(self) -> torch.Tensor:
        with torch.no_grad():
            return self.codebook  # C W^T [K, D]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        quantized, indices, loss = SimVQ.forward(self, x)
        if self.training:
            self.usage.update(indices)
        return quantized, indices, loss


class SimResidualVQ(LibraryResidual):
    """`vector_quantize_pytorch.ResidualSimVQ`'s levels (straight-through, no rotation trick) with the interface of
    `studylib.quantizers.ema.ResidualVectorQuantizer`. `generator` seeds the frozen bases and W (see `drawn_from`)
    and draws quantizer dropout; `decay` and `threshold` define the reported dead codes only. ``detach_residual``
    as for `PeerResidualVQ` (the library's `ResidualSimVQ` always detaches; False here is EnCodec's residual,
    the study's default for every arm)."""

    def __init__(
        self,
        dimension: int = 128,
        n_q: int = 32,
        bins: int = 1024,
        quantizer_dropout: bool = False,
        detach_residual: bool = False,
        generator: torch.Generator | None = None,
        decay: float = 0.99,
        threshold: float = 2.0,
    ):
        super().__init__()
        if not isinstance(n_q, int) or n_q < 1:
            raise ValueError(f"n_q: got {n_q!r}, allowed an integer >= 1")
        self.dimension, self.n_q, self.bins = dimension, n_q, bins
        self.quantizer_dropout, self.detach_residual = quantizer_dropout, detach_residual
        self.generator = generator
        with drawn_from(generator):
            self.rvq = ResidualSimVQ(dim=dimension, num_quantizers=n_q, codebook_size=bins, rotation_trick=False)
        for layer in self.rvq.layers:
            SimCodebook.adopt(layer, decay, threshold)

    @property
    def codebooks(self) -> list[SimCodebook]:
        return list(self.rvq.layers)

    @torch.no_grad()
    def encode(self, x: torch.Tensor, frame_rate: float, bandwidth: float | None = None) -> torch.Tensor:
        """x [B, D, T] -> codes [n_q, B, T] (the library's lookup; nothing counted)."""
        residual, codes = x.transpose(1, 2), []
        for layer in self.rvq.layers[: self.get_num_quantizers_for_bandwidth(frame_rate, bandwidth)]:
            quantized, indices, _ = SimVQ.forward(layer, residual)
            residual = residual - quantized
            codes.append(indices)
        return torch.stack(codes)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [n_q, B, T] -> quantized [B, D, T]."""
        return sum(layer.indices_to_codes(indices) for layer, indices in zip(self.rvq.layers, codes)).transpose(1, 2)
