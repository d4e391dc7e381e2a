"""What every residual quantizer of studylib shares: its result type, the bitrate arithmetic, EnCodec's bandwidth ->
levels schedule, the per-level metrics they report by one definition, and the reporting EMA of code usage for
codebooks learned by gradient (dac, simvq). The EMA codebook and its expiry modes: `studylib.quantizers.ema`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn


def ema_(moving_avg: torch.Tensor, new: torch.Tensor, decay: float) -> None:
    """moving_avg <- decay * moving_avg + (1 - decay) * new, in place (EnCodec's `ema_inplace`)."""
    moving_avg.mul_(decay).add_(new, alpha=1 - decay)



# ------------------------------------------------------------------------------------ residual VQ


@dataclass
class QuantizedResult:
    quantized: torch.Tensor  # [B, D, T]
    codes: torch.Tensor  # [n_q, B, T]
    bandwidth: torch.Tensor  # kbps actually used (scalar)
    penalty: torch.Tensor | None = None  # mean commitment loss over levels
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # flat, per level: used_l0, ...



def nominal_kbps(n_q: int, bins: int, frame_rate: float) -> float:
    """Bitrate of n_q levels of fixed-length codes: n_q x log2(bins) bits per frame x frame_rate / 1000
    (EnCodec 24 kHz: 8 x 10 bits x 75 Hz = 6 kbps). Every kbps figure of studylib comes from here."""
    return n_q * math.log2(bins) * frame_rate / 1000



@torch.no_grad()
def codebook_metrics(codebooks: list, codes: torch.Tensor, bins: int,
                     replaced_before: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per level of codes [n_q, ...] from `codebooks` (anything with `dead_mask()` and `replaced_total`,
    so our RVQ and the peer arm report by the same definitions): codes used in the batch, batch perplexity,
    dead codes (configured threshold), codes replaced since `replaced_before`. Tensors, so logging decides
    when to synchronise."""
    n_q = codes.shape[0]
    offsets = torch.arange(n_q, device=codes.device)[:, None] * bins
    counts = torch.bincount((codes.reshape(n_q, -1) + offsets).flatten(), minlength=n_q * bins)
    counts = counts.view(n_q, bins).float()  # [n_q, K] batch histogram per level
    per_level = {
        "used": (counts > 0).sum(1),
        "perplexity": torch.exp(torch.special.entr(counts / counts.sum(1, keepdim=True)).sum(1)),
        "dead": torch.stack([cb.dead_mask().sum() for cb in codebooks[:n_q]]),
        "replaced": torch.stack([cb.replaced_total for cb in codebooks[:n_q]]) - torch.stack(replaced_before),
    }
    return {f"{name}_l{level}": values[level] for name, values in per_level.items() for level in range(n_q)}



class LevelSchedule:
    """EnCodec's bandwidth -> number of levels, shared by our RVQ and the peer arm. Needs `bins`, `n_q`,
    `quantizer_dropout`, `generator` and nn.Module's `training`."""

    def get_bandwidth_per_quantizer(self, frame_rate: float) -> float:
        """kbps of one level: log2(bins) bits per frame."""
        return nominal_kbps(1, self.bins, frame_rate)

    def get_num_quantizers_for_bandwidth(self, frame_rate: float, bandwidth: float | None = None) -> int:
        if bandwidth and bandwidth > 0.0:
            return int(max(1, math.floor(bandwidth / self.get_bandwidth_per_quantizer(frame_rate))))
        return self.n_q

    def levels_for_step(self, frame_rate: float, bandwidth: float | None = None) -> int:
        """Levels used by this forward: the bandwidth's, or under quantizer dropout (training only) a
        uniform draw in [1, that]."""
        n_q = self.get_num_quantizers_for_bandwidth(frame_rate, bandwidth)
        if self.training and self.quantizer_dropout:
            n_q = int(torch.randint(1, n_q + 1, (1,), generator=self.generator))
        return n_q

    def resume_state(self) -> dict:
        """What a checkpoint needs beyond state_dict() to resume exactly when the dropout draw is the quantizer's
        only random state (dac, simvq); the EMA quantizers add their own."""
        return {"generator": self.generator.get_state() if self.generator is not None else None}

    def load_resume_state(self, state: dict) -> None:
        if self.generator is not None:
            self.generator.set_state(state["generator"])



# ------------------------------------------------------- codebooks learned by gradient (dac, simvq)


class CodeUsage(nn.Module):
    """Reporting only: an EMA (decay 0.99) of each code's count per training batch, for quantizers whose codebook
    is learned by gradient and keeps no EMA statistics (`studylib.quantizers.factorized`, the SimVQ peer), so that their
    ``dead_l{i}`` means what it means for the EMA arms: a code whose EMA count is below the threshold (EnCodec's
    2). Nothing in a forward reads it. ``counts`` is persistent, so a checkpoint's evaluation reports the same
    dead codes and a resumed run continues it; it starts at 0 (every code "dead" until used)."""

    def __init__(self, bins: int, decay: float = 0.99, threshold: float = 2.0):
        super().__init__()
        self.bins, self.decay, self.threshold = bins, float(decay), float(threshold)
        self.register_buffer("counts", torch.zeros(bins))
        # nothing is ever replaced; kept so that `codebook_metrics` and the training loop read every arm alike
        self.register_buffer("replaced_total", torch.zeros((), dtype=torch.long), persistent=False)

    @torch.no_grad()
    def update(self, codes: torch.Tensor) -> None:
        """One training batch's codes (any shape) into the EMA."""
        ema_(self.counts, torch.bincount(codes.reshape(-1), minlength=self.bins).to(self.counts.dtype), self.decay)

    def dead_mask(self) -> torch.Tensor:
        """Codes whose EMA count is below the threshold -> bool [K]."""
        return self.counts < self.threshold



class ReportsUsage:
    """Mixin for one level of a gradient-learned quantizer: what the training loop and `codebook_metrics` read of a
    codebook (`dead_mask()`, ``replaced_total``, ``embed``, checked for NaN), from its ``usage`` (a `CodeUsage`)
    and its `code_vectors()` [K, d]."""

    usage: CodeUsage

    def code_vectors(self) -> torch.Tensor:
        raise NotImplementedError

    def dead_mask(self) -> torch.Tensor:
        return self.usage.dead_mask()

    @property
    def replaced_total(self) -> torch.Tensor:
        return self.usage.replaced_total

    @property
    def embed(self) -> torch.Tensor:
        return self.code_vectors()



@contextlib.contextmanager
def drawn_from(generator: torch.Generator | None) -> Iterator[None]:
    """Parameters created inside draw from a seed taken from `generator`, and torch's global CPU RNG is left as
    it was. Why: a quantizer with learned parameters built between the encoder and the decoder would otherwise
    shift the decoder's initial weights, and arms compared seed by seed must start from the same encoder and
    decoder. None: the global RNG, as everywhere in studylib."""
    if generator is None:
        yield
        return
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)  # CPU only: the CUDA generators stay untouched
        yield
