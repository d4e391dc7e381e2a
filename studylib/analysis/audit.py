"""Codebook audit of any EnCodec-format checkpoint: the EMA statistics behind encodec issue #61.

    studylib audit CHECKPOINT [--manifest M --split test --bandwidth 6.0] [--out report.csv]

Why: the issue's argument needs nothing but a trained model's buffers. The EMA counts ``cluster_size``
sum to about the frames per step N one GPU saw, so at most N / threshold codes can hold a count >= the
threshold: with N = 600 and EnCodec's threshold 2, at least 724 of 1024 codes read as "dead" on every
step, whatever the expiry does. `audit_state_dict` reads this off any state dict (official EnCodec
weights, our runs, the peer arm); `audit_usage` measures which codes the model actually picks on audio,
which tells a dead code from one merely below the threshold.

Where it does not apply: `quantizer: dac` and `simvq` learn their codebooks by gradient and keep no EMA statistics,
so `audit` refuses their checkpoints; `audit_usage` works on any codec (their dead codes come from a reporting EMA
of code counts, `quantization.CodeUsage`).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
import torch

from studylib.core.config import check_option
from studylib.core.storage import UnreadableCheckpoint, atomic_write
from studylib.model.codec import EMA_QUANTIZERS, Codec, CodecConfig
from studylib.model.metrics import utilization
from studylib.quantizers.base import nominal_kbps
from studylib.training.manifest import SPLITS, CorpusError, load_manifest
from studylib.training.run_folder import checkpoint_path, codec_from_checkpoint, read_checkpoint

# EnCodec / our RVQ: [prefix.]vq.layers.{i}._codebook.{inited,cluster_size,embed,embed_avg}; the peer arm
# (studylib.quantizers.peer): [prefix.]rvq.layers.{i}._codebook.{initted,...} with a leading codebook axis of 1.
_CODEBOOK_KEY = re.compile(
    r"^(?P<rvq>(?:.+\.)?r?vq)\.layers\.(?P<level>\d+)\._codebook\.(?P<name>inited|initted|cluster_size|embed)$"
)
LEVEL_COLUMNS = ("level", "inited", "sum", "min", "median", "max", "below", "dead_floor", "rel_threshold",
                 "below_rel", "embed_norm_median")
USAGE_COLUMNS = ("level", "usage", "used", "perplexity", "entropy_bits", "dead")


def _codebooks(state_dict: Mapping[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Per level, the buffers {inited, cluster_size, embed} of one RVQ's codebooks."""
    levels: dict[int, dict[str, torch.Tensor]] = {}
    owners = set()
    for key, value in state_dict.items():
        if match := _CODEBOOK_KEY.match(key):
            owners.add(match["rvq"])
            levels.setdefault(int(match["level"]), {})[match["name"].replace("initted", "inited")] = value
    if not levels:
        raise ValueError("no RVQ codebooks found: expected keys such as "
                         "quantizer.vq.layers.0._codebook.cluster_size")
    if len(owners) > 1:
        raise ValueError(f"codebooks of several quantizers ({', '.join(sorted(owners))}); pass one model's")
    if sorted(levels) != list(range(len(levels))):
        raise ValueError(f"RVQ levels {sorted(levels)} are not numbered 0..{len(levels) - 1}")
    for level, buffers in levels.items():
        if missing := {"inited", "cluster_size", "embed"} - set(buffers):
            raise ValueError(f"level {level}: codebook buffers {sorted(missing)} missing")
    return [levels[level] for level in range(len(levels))]


def audit_state_dict(state_dict: Mapping[str, torch.Tensor], threshold: float = 2.0,
                     frames_per_step: int | None = None, relative: float = 0.1) -> pd.DataFrame:
    """One row per RVQ level of the EMA codebook statistics, from a whole-model or bare-quantizer state dict.

    Columns: level; bins (K); inited; sum, min, median, max of ``cluster_size`` (sum ~ frames per step per
    GPU in training); threshold; below / frac_below (codes with a count below the absolute threshold);
    dead_floor (K - floor(sum / threshold): the fewest codes that can be below it, as counts sum to
    ``sum``); rel_threshold (``relative`` x sum / K, Moshi's rule, independent of the batch size);
    below_rel / frac_below_rel; embed_norm_min/median/max (L2 norms of the codes); frames_per_step and
    sum_per_frame (sum / frames_per_step), NaN unless frames_per_step is given.
    """
    rows = []
    for level, buffers in enumerate(_codebooks(state_dict)):
        counts = buffers["cluster_size"].detach().cpu().double().reshape(-1).numpy()
        bins = counts.size
        norms = buffers["embed"].detach().cpu().double().reshape(bins, -1).norm(dim=1).numpy()
        total = float(counts.sum())
        rel_threshold = relative * total / bins
        below, below_rel = int((counts < threshold).sum()), int((counts < rel_threshold).sum())
        rows.append({
            "level": level, "bins": bins, "inited": bool(buffers["inited"].reshape(-1)[0]),
            "sum": total, "min": float(counts.min()), "median": float(np.median(counts)), "max": float(counts.max()),
            "threshold": threshold, "below": below, "frac_below": below / bins,
            "dead_floor": max(0, bins - math.floor(total / threshold)) if threshold > 0 else 0,
            "rel_threshold": rel_threshold, "below_rel": below_rel, "frac_below_rel": below_rel / bins,
            "embed_norm_min": float(norms.min()), "embed_norm_median": float(np.median(norms)),
            "embed_norm_max": float(norms.max()),
            "frames_per_step": float(frames_per_step) if frames_per_step else math.nan,
            "sum_per_frame": total / frames_per_step if frames_per_step else math.nan,
        })
    return pd.DataFrame(rows)


# -------------------------------------------------------------------------------------------- usage


def _as_batch(wav: torch.Tensor | np.ndarray) -> torch.Tensor:
    """[T], [C, T] or [B, C, T] -> [B, C, T] float32."""
    wav = torch.as_tensor(wav, dtype=torch.float32)
    return wav.reshape(1, 1, -1) if wav.dim() == 1 else wav[None] if wav.dim() == 2 else wav


def manifest_audio(manifest: str | Path, split: str, sample_rate: int) -> list[torch.Tensor]:
    """Every segment of one split of a corpus manifest, whole, as [C, T] tensors."""
    if split not in SPLITS:
        raise ValueError(f"split: got {split!r}, allowed {SPLITS}")
    manifest = Path(manifest)
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest}: no such manifest")
    rows = load_manifest(manifest, check_files=True).query("split == @split")  # undecodable: one line naming it
    if rows.empty:
        raise ValueError(f"split {split!r} is empty in {manifest}")
    wavs = []
    for path in rows["path"]:
        audio, rate = sf.read(str(manifest.parent / path), dtype="float32", always_2d=True)
        if rate != sample_rate:
            raise ValueError(f"{path} is {rate} Hz; the codec needs {sample_rate} Hz")
        wavs.append(torch.from_numpy(audio.T.copy()))
    return wavs


def audit_usage(codec: Codec, audio: Iterable[torch.Tensor | np.ndarray] | str | Path,
                bandwidth: float | None = None, split: str = "test") -> pd.DataFrame:
    """Code use per level on audio: `metrics.utilization` (usage = fraction of codes used at least once,
    perplexity = exp entropy, dead = the quantizer's own dead mask) plus frames and bandwidth.

    `audio`: waveforms ([T], [C, T] or [B, C, T] at the codec's rate) or a corpus manifest, of which
    `split` is encoded. The codec encodes in eval mode (no codebook update) and keeps its mode.
    """
    if isinstance(audio, (str, Path)):
        audio = manifest_audio(audio, split, codec.config.sample_rate)
    device = next(codec.parameters()).device
    was_training = codec.training
    codec.eval()
    try:
        with torch.no_grad():
            codes = [codec.encode(_as_batch(wav).to(device), bandwidth) for wav in audio]  # [n_q, B, F] each
    finally:
        codec.train(was_training)
    if not codes:
        raise ValueError("audio: no waveforms to encode")
    flat = torch.cat([c.reshape(c.shape[0], -1) for c in codes], dim=1)  # [n_q, frames]
    n_q = flat.shape[0]
    dead = torch.stack([cb.dead_mask() for cb in codec.quantizer.codebooks[:n_q]])
    usage = utilization(flat, codec.config.bins, dead)
    usage["frames"] = flat.shape[1]
    usage["bandwidth"] = nominal_kbps(n_q, codec.config.bins, codec.config.frame_rate)
    return usage


# ------------------------------------------------------------------------------------ checkpoints


@dataclass
class AuditReport:
    """What `audit` found: per-level EMA statistics, code use on audio (None without audio), and where
    the numbers come from."""

    levels: pd.DataFrame
    usage: pd.DataFrame | None
    source: str

    def table(self) -> pd.DataFrame:
        """levels with the usage columns joined as eval_* (NaN for levels the bandwidth skipped)."""
        if self.usage is None:
            return self.levels
        return self.levels.merge(self.usage.add_prefix("eval_").rename(columns={"eval_level": "level"}),
                                 on="level", how="left")

    def format(self) -> str:
        """The report as text: source, EMA statistics per level, then code use if measured."""
        fmt = lambda v: f"{v:.4g}"
        lines = [
            self.source,
            f"EMA usage (cluster_size) per level: below = count < {self.levels['threshold'].iloc[0]:g}, "
            "dead_floor = fewest codes that can be below it given the sum, below_rel = count < rel_threshold",
            self.levels[list(LEVEL_COLUMNS)].to_string(index=False, float_format=fmt),
        ]
        if self.usage is not None:
            first = self.usage.iloc[0]
            lines += [f"code use on {int(first['frames'])} frames at {first['bandwidth']:g} kbps:",
                      self.usage[list(USAGE_COLUMNS)].to_string(index=False, float_format=fmt)]
        return "\n".join(lines)


def load_codebook_checkpoint(path: str | Path) -> tuple[Mapping[str, torch.Tensor], CodecConfig, str, int | None]:
    """(state dict, codec config, description, frames per step or None) of a studylib run's
    checkpoint.pt (or its folder) or a plain state dict file such as encodec_24khz-d7cc33bc.th."""
    path = checkpoint_path(path)
    try:  # loads tensors and plain containers only: downloaded files must not run code (RefusedFile)
        obj = read_checkpoint(path)
    except UnreadableCheckpoint as e:
        raise ValueError(f"{path}: not a PyTorch checkpoint ({e.reason})") from None
    if isinstance(obj, Mapping) and "model" in obj and "config" in obj:
        # The stored config labels the report: it must describe these weights, not merely sit beside them.
        with torch.random.fork_rng(devices=[]):  # building the reference model must not move the global RNG
            _, cfg = codec_from_checkpoint(obj, path)
        codec_cfg, frames = cfg.codec_config(), cfg.frames_per_step
        source = (f"studylib run checkpoint {path}: step {obj.get('step')}, model {cfg.model}, expiry "
                  f"{cfg.expiry_mode} (threshold {cfg.expiry_threshold:g} {cfg.expiry_threshold_kind}), "
                  f"{frames} frames per step per rank")
        return obj["model"], codec_cfg, source, frames
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, CodecConfig.encodec_24khz(), f"state dict {path} (read as EnCodec's 24 kHz model)", None
    raise ValueError(f"{path}: not a model checkpoint (expected a state dict or a studylib run checkpoint)")


def _codec(state_dict: Mapping[str, torch.Tensor], config: CodecConfig, path: str | Path) -> Codec:
    if not any(key.startswith("encoder.") for key in state_dict):
        raise ValueError(f"{path}: holds a quantizer only; measuring code use needs the whole model")
    return Codec.from_encodec(state_dict, config)  # EnCodec keys are renamed; ours pass unchanged


def audit(checkpoint: str | Path, audio: Iterable[torch.Tensor] | str | Path | None = None, split: str = "test",
          bandwidth: float | None = None, threshold: float = 2.0, frames_per_step: int | None = None) -> AuditReport:
    """Audit a run's checkpoint or an EnCodec state dict; with `audio` (waveforms or a manifest, see
    `audit_usage`) also measure code use. frames_per_step defaults to the run's own (None for EnCodec's)."""
    state_dict, config, source, run_frames = load_codebook_checkpoint(checkpoint)
    if config.quantizer not in EMA_QUANTIZERS:
        raise ValueError(f"{checkpoint}: quantizer {config.quantizer!r} keeps no EMA statistics (its codebook is "
                         "learned by gradient): nothing to audit; its code use on audio is `audit_usage`'s")
    try:
        levels = audit_state_dict(state_dict, threshold, frames_per_step or run_frames)
    except ValueError as e:
        raise ValueError(f"{checkpoint}: {e}") from None
    usage = None if audio is None else audit_usage(_codec(state_dict, config, checkpoint), audio, bandwidth, split)
    return AuditReport(levels, usage, source)


# ---------------------------------------------------------------------------------------------- CLI


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="studylib audit", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a run folder or its checkpoint.pt, or an EnCodec state dict (.th)")
    parser.add_argument("--manifest", help="corpus manifest: also measure code use on one of its splits")
    parser.add_argument("--split", default="test", choices=SPLITS, help="split of --manifest (default: test)")
    parser.add_argument("--bandwidth", type=float, help="kbps for the code use (default: all levels)")
    parser.add_argument("--threshold", type=float, default=2.0, help="absolute dead-code threshold (default: 2)")
    parser.add_argument("--frames-per-step", type=int, help="frames per training step per GPU, if known")
    parser.add_argument("--out", help="write the table as CSV (usage columns prefixed eval_)")
    args = parser.parse_args(argv)
    try:
        check_option("--bandwidth", args.bandwidth, 0, low_open=True)
        check_option("--threshold", args.threshold, 0)
        check_option("--frames-per-step", args.frames_per_step, 1, integer=True)
        report = audit(args.checkpoint, args.manifest, args.split, args.bandwidth, args.threshold,
                       args.frames_per_step)
    except (FileNotFoundError, ValueError, CorpusError) as e:
        print(f"studylib audit: {e}", file=sys.stderr)
        return 2
    print(report.format())
    if args.out:
        atomic_write(Path(args.out), lambda p: report.table().to_csv(p, index=False))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
