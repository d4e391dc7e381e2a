"""Bounds checked before a run spends memory or writes anything: a training step that would not fit in this
machine's memory, and inputs that must exist. Each is one `UserError` line naming the key and the limit.

The memory estimate of one training step (`step_memory`) is deliberately simple and on the safe side of what
it can know: the codec's weights and buffers counted on torch's meta device (no memory spent) times four (weights,
gradients, Adam's two moments), the activations kept for the backward pass (every conv stage of encoder and decoder
at its width and rate, a few tensors each), and the codebook lookup of one level (frames x codes distances).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from studylib.core.config import UserError
from studylib.model.codec import Codec, CodecConfig
from studylib.quantizers.base import nominal_kbps
from studylib.training.run_config import TrainConfig

GB = 1 << 30
TENSORS_PER_STAGE = 6  # conv outputs, activations, residual sums, norms... kept for backward (a safe round figure)


@dataclass(frozen=True)
class StepMemory:
    """Bytes one training step needs, by part, and the key that drives the largest one."""

    state: int  # weights, buffers, gradients and Adam's moments
    activations: int  # kept for the backward pass
    lookup: int  # one level's frames x codes distances (and their argmin workspace)

    @property
    def total(self) -> int:
        return self.state + self.activations + self.lookup

    def largest(self) -> str:
        parts = {"batch_size": self.activations, "n_q": self.state, "bins": self.lookup}
        return max(parts, key=parts.get)


def step_memory(cfg: TrainConfig) -> StepMemory:
    """The estimate of one training step's memory for `cfg` (see the module docstring)."""
    codec = cfg.codec_config()
    samples = cfg.batch_size * math.ceil(cfg.segment_seconds * codec.sample_rate)
    width, rate, per_sample = codec.n_filters, 1, 0.0
    for ratio in (1, *reversed(codec.ratios)):  # encoder stages (the decoder mirrors them)
        rate *= ratio
        per_sample += width / rate
        width *= 2 if ratio != 1 else 1
    activations = int(2 * TENSORS_PER_STAGE * 4 * samples * per_sample)
    frames = cfg.batch_size * math.ceil(cfg.segment_seconds * codec.frame_rate)
    return StepMemory(state=_state_bytes(codec), activations=activations, lookup=int(3 * 4 * frames * cfg.bins))


@functools.lru_cache(maxsize=64)
def _state_bytes(codec: CodecConfig) -> int:
    """Weights x 4 (weights, gradients, Adam's two moments) + buffers, float32. One level is built on the meta
    device (nothing allocated), the others counted as copies of it: building n_q = 100,000 levels only to count
    them would itself take a minute."""
    one = replace(codec, n_q=1, target_bandwidths=(nominal_kbps(1, codec.bins, codec.frame_rate),))
    with torch.device("meta"):
        model = Codec(one)
    level_weights = sum(p.numel() for p in model.quantizer.parameters())
    level_buffers = sum(b.numel() for b in model.quantizer.buffers())
    weights = sum(p.numel() for p in model.parameters()) + (codec.n_q - 1) * level_weights
    buffers = sum(b.numel() for b in model.buffers()) + (codec.n_q - 1) * level_buffers
    return 4 * (4 * weights + buffers)


def available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where it cannot be read)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_fits(cfg: TrainConfig, available: int | None = None) -> StepMemory | None:
    """UserError naming the key that drives a training step's memory past what this machine has available. Runs on
    the CPU only (MemAvailable; a CUDA device's memory is torch's to report): None for a run that will use CUDA."""
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        return None
    need = step_memory(cfg)
    available = available_memory() if available is None else available
    if available is not None and need.total > available:
        key = need.largest()
        raise UserError(
            f"{key}: {getattr(cfg, key)} (batch_size {cfg.batch_size}, segment_seconds {cfg.segment_seconds}, "
            f"n_q {cfg.codec_config().n_q}, bins {cfg.bins}, model {cfg.model}): a training step needs about "
            f"{need.total / GB:.1f} GB by studylib's estimate (weights and optimiser {need.state / GB:.1f}, "
            f"activations {need.activations / GB:.1f}, codebook lookup {need.lookup / GB:.1f}), this machine has "
            f"{available / GB:.1f} GB available; lower {key}")
    return need


def check_inputs(cfg: TrainConfig) -> None:
    """Paths a run reads before it starts: `init_from` must be a run folder or checkpoint file."""
    if cfg.init_from and not Path(cfg.init_from).exists():
        raise UserError(f"init_from: {cfg.init_from} does not exist; give a finished run folder or its checkpoint")
