"""Opus baseline (EnCodec's reference codec) through opus-tools' `opusenc` / `opusdec` (Debian: opus-tools).

Audio goes through a temporary 32-bit float WAV at 24 kHz, ``opusenc --bitrate K`` (VBR, complexity 10, 20 ms
frames: opusenc's defaults) and ``opusdec --rate 24000 --float`` (no dither, no 16-bit rounding). opusdec drops
the encoder's pre-skip and trims the end to the length stored in the Ogg granule positions, so the output is
sample-aligned with the input and has its length (checked), which is what makes SI-SDR meaningful.

Bitrates (opus-tools 0.2, libopus 1.3.1): opusenc rejects requests below 0.5 kbps and calls 6-256 kbps per
channel meaningful. Every request below 4.8 kbps gives the same stream (libopus's floor, about 4.3 kbps of
payload), so 1.5 or 3 kbps are not real Opus operating points; `OpusResult.payload_kbps` says what was spent.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from studylib.model.codec import SAMPLE_RATE

OPUS_MIN_KBPS = 0.5  # the lowest request opusenc accepts (it clamps it to its ~4.8 kbps floor)
# kbps asked of opusenc wherever Opus is scored: its floor (0.5 asked, ~5 kbps spent) and EnCodec's comparison points
OPUS_BITRATES = (OPUS_MIN_KBPS, 6.0, 12.0, 24.0)
OPUS_MAX_KBPS = 256.0  # per channel; opusenc clamps higher requests
OPUS_TOOLS = ("opusenc", "opusdec")
MISSING = "the Opus baseline needs opusenc and opusdec: apt-get install opus-tools"


@dataclass(frozen=True)
class OpusResult:
    audio: np.ndarray  # [T] float32 at 24 kHz, aligned with the input
    payload_kbps: float  # Opus packets only (what a codec comparison should count)
    file_kbps: float  # the whole Ogg file: headers, tags and container overhead included


def opus_available() -> bool:
    """Whether opusenc and opusdec are on PATH."""
    return all(shutil.which(tool) for tool in OPUS_TOOLS)


def require_opus() -> None:
    """Raise RuntimeError naming the package to install when opus-tools is missing (callers skip with it)."""
    if not opus_available():
        raise RuntimeError(MISSING)


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise RuntimeError(f"{command[0]} failed (exit {done.returncode}): {last}")


def _packet_sizes(ogg: bytes) -> list[int]:
    """Byte sizes of the packets of a single-stream Ogg file, in order (from every page's lacing values)."""
    sizes, current, pos = [], 0, 0
    while pos < len(ogg):
        if ogg[pos:pos + 4] != b"OggS":
            raise RuntimeError(f"opusenc wrote a malformed Ogg page at byte {pos}")
        lacing = ogg[pos + 27:pos + 27 + ogg[pos + 26]]
        for value in lacing:
            current += value
            if value < 255:  # a lacing value below 255 ends a packet
                sizes.append(current)
                current = 0
        pos += 27 + len(lacing) + sum(lacing)
    return sizes


def opus_encode_decode(wav: np.ndarray | torch.Tensor, kbps: float) -> OpusResult:
    """Encode mono 24 kHz audio [T] with Opus at `kbps` and decode it back, with the bitrate actually spent."""
    require_opus()
    audio = wav.detach().cpu().numpy() if isinstance(wav, torch.Tensor) else np.asarray(wav)
    if audio.ndim != 1 or audio.size == 0:
        raise ValueError(f"expected mono audio [T] with T > 0, got shape {audio.shape}")
    if not np.isfinite(audio).all():
        raise ValueError("audio holds NaN or Inf")
    if not OPUS_MIN_KBPS <= kbps <= OPUS_MAX_KBPS:
        raise ValueError(f"kbps: got {kbps}, allowed {OPUS_MIN_KBPS} to {OPUS_MAX_KBPS} (opusenc's range)")
    with tempfile.TemporaryDirectory() as tmp:
        source, coded, decoded = Path(tmp, "in.wav"), Path(tmp, "coded.opus"), Path(tmp, "out.wav")
        sf.write(source, audio.astype(np.float32), SAMPLE_RATE, subtype="FLOAT")
        _run(["opusenc", "--quiet", "--serial", "0", "--bitrate", f"{kbps:g}", str(source), str(coded)])
        _run(["opusdec", "--quiet", "--float", "--rate", str(SAMPLE_RATE), str(coded), str(decoded)])
        out, rate = sf.read(decoded, dtype="float32")
        ogg = coded.read_bytes()
    if rate != SAMPLE_RATE or out.ndim != 1 or out.shape[0] != audio.shape[0]:
        raise RuntimeError(f"opusdec returned {out.shape} at {rate} Hz for {audio.shape} at {SAMPLE_RATE} Hz")
    seconds = audio.shape[0] / SAMPLE_RATE
    payload = sum(_packet_sizes(ogg)[2:])  # packets 0 and 1 are the OpusHead and OpusTags headers
    return OpusResult(out, payload * 8 / seconds / 1000, len(ogg) * 8 / seconds / 1000)


def opus_roundtrip(wav: np.ndarray | torch.Tensor, kbps: float) -> np.ndarray:
    """Mono 24 kHz audio [T] through Opus at `kbps` and back: [T] float32, sample-aligned with the input."""
    return opus_encode_decode(wav, kbps).audio
