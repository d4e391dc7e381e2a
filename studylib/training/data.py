"""Training data: fixed-length crops from a corpus manifest written by `studylib corpus`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from torch.utils.data import Dataset

from studylib.model.codec import SAMPLE_RATE
from studylib.training.manifest import SPLITS, ManifestError, check_audio_files, load_manifest


class BadAudio(ManifestError):
    """An audio file of the corpus that a run finds unusable as it reads it; the message names it."""


class NonFiniteAudio(BadAudio):
    """An audio file of the corpus holds NaN or Inf samples; the message names it."""


class AudioDataset(Dataset):
    """Mono float32 crops `[1, T]` of one split of a manifest.

    Training crops are random but a pure function of (seed, epoch, index), so a resumed run sees the
    same crops; call `set_epoch` at the start of each epoch. Valid/test items are the fixed,
    non-overlapping windows of every segment, so every evaluation sees the same audio. `train`
    defaults to `split == "train"`. Segments shorter than a crop are zero-padded at the end.

    The manifest is checked whole when the dataset is made (ManifestError naming it: missing, a folder,
    other columns, listed files missing, undecodable or truncated, another sample rate), and every crop as it
    is read (BadAudio naming the file: NaN or Inf samples, bytes that stop decoding), so bad data stops a run
    with a reason instead of training on NaN or crashing."""

    def __init__(
        self,
        manifest: str | Path,
        split: str,
        segment_seconds: float = 1.0,
        sample_rate: int = SAMPLE_RATE,
        train: bool | None = None,
        seed: int = 0,
    ):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        frame = load_manifest(manifest)
        rows = frame.query("split == @split")
        if rows.empty:
            raise ManifestError(f"split {split!r} is empty in {manifest}")
        # all of them, every split: a run should not find out mid-run or at its evaluation
        check_audio_files(manifest, frame, sample_rate)
        root = Path(manifest).parent
        self.files = [root / path for path in rows["path"]]
        self.frames = [round(seconds * sample_rate) for seconds in rows["seconds"]]
        self.length = round(segment_seconds * sample_rate)
        self.sample_rate = sample_rate
        self.train = split == "train" if train is None else train
        self.seed = seed
        self.epoch = 0
        # (segment, start) of every evaluation window; a segment shorter than a window gives one.
        self.windows = [
            (segment, start)
            for segment, frames in enumerate(self.frames)
            for start in range(0, max(frames - self.length, 0) + 1, self.length)
        ]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.files) if self.train else len(self.windows)

    def __getitem__(self, index: int) -> torch.Tensor:
        if self.train:
            segment = index
            # Seeded per item, not from a shared stream, so DataLoader workers and resumed runs agree.
            state = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1, np.uint64)[0]
            generator = torch.Generator().manual_seed(int(state))
            room = max(self.frames[index] - self.length, 0)
            start = int(torch.randint(room + 1, (1,), generator=generator))
        else:
            segment, start = self.windows[index]
        try:
            audio, _ = sf.read(str(self.files[segment]), start=start, frames=self.length, dtype="float32",
                               always_2d=True)
        except (RuntimeError, OSError) as error:  # damaged since the check: soundfile's errors are RuntimeErrors
            raise BadAudio(f"{self.files[segment]}: undecodable audio at {start / self.sample_rate:.1f} s "
                           f"({' '.join(str(error).split())[:120]}); remove it from the manifest or rebuild the "
                           "corpus") from None
        if not np.isfinite(audio).all():
            raise NonFiniteAudio(f"{self.files[segment]}: holds NaN or Inf samples; remove it from the manifest or "
                                 "rebuild the corpus (`studylib corpus` skips such files)")
        crop = torch.zeros(1, self.length)
        crop[0, : audio.shape[0]] = torch.from_numpy(audio.mean(axis=1))
        return crop
