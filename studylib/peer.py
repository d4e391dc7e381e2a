"""The peer arm: lucidrains' vector-quantize-pytorch `ResidualVQ` behind our quantizer's interface.

Why: the study sets EnCodec's expiry (buggy and fixed, `studylib.quantization`) against an independent,
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
"""

from __future__ import annotations

import torch
from torch import nn
from vector_quantize_pytorch import ResidualVQ
from vector_quantize_pytorch.residual_vq import frac_gradient
from vector_quantize_pytorch.vector_quantize_pytorch import Codebook

from studylib.quantization import LevelSchedule, QuantizedResult, codebook_metrics, nominal_kbps


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


class PeerResidualVQ(LevelSchedule, nn.Module):
    """`vector_quantize_pytorch.ResidualVQ` (EMA, k-means init, its own expiry) with the interface of
    `studylib.quantization.ResidualVectorQuantizer`: x [B, D, T] in, `QuantizedResult` out.

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

    def forward(self, x: torch.Tensor, frame_rate: float, bandwidth: float | None = None) -> QuantizedResult:
        n_q = self.levels_for_step(frame_rate, bandwidth)
        replaced_before = [cb.replaced_total.clone() for cb in self.codebooks[:n_q]] if self.training else []

        x_last = x.transpose(1, 2)  # [B, T, D]: the library is channel-last
        quantized_out, residual = torch.zeros_like(x_last), x_last
        codes, losses = [], []
        for layer in self.rvq.layers[:n_q]:  # ResidualVQ.forward's loop, first n_q levels
            quantized, indices, loss = layer(residual)
            residual = residual - frac_gradient(quantized, self.rvq.quant_grad_frac)
            quantized_out = quantized_out + quantized
            codes.append(indices)
            losses.append(loss)
        if self.training and self.detach_residual:
            quantized_out = x_last + (quantized_out - x_last).detach()

        codes_t = torch.stack(codes)  # [n_q, B, T]
        # Our metric code run on the library's codebooks, so both arms report by the same definitions.
        metrics = codebook_metrics(self.codebooks, codes_t, self.bins, replaced_before) if self.training else {}
        bw = torch.tensor(nominal_kbps(n_q, self.bins, frame_rate)).to(x)
        return QuantizedResult(quantized_out.transpose(1, 2), codes_t, bw, penalty=torch.stack(losses).mean(),
                               metrics=metrics)

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
