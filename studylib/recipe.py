"""The CPU recipe study (`notebooks/06_cpu_recipe.ipynb`): why a fresh codec ignores its input, and which
departures from EnCodec's recipe make the `cpu`-scale codec learn.

`signal_trace` follows a batch through a fresh codec layer by layer; `VARIANTS` are the recipe pieces,
switched on one at a time and together, each a `TrainConfig` overlay on top of the `cpu` scale with
the `none` arm; `curves` and `targets` turn their runs into the report's tables.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch

from studylib.codec import Codec

# The targets of the recipe (study corpus test split, 6 kbps) and the plateau they are measured against.
TARGETS = {"si_sdr": ("above", 0.0), "perplexity_l0": ("at least", 64.0), "mel_distance": ("at most", 4.0)}


@dataclass(frozen=True)
class Variant:
    """One recipe: a name, what it changes (for the table), and its TrainConfig overrides."""

    name: str
    change: str
    overrides: dict


@torch.no_grad()
def signal_trace(codec: Codec, wav: torch.Tensor) -> pd.DataFrame:
    """Per layer of the encoder then the decoder (fed the unquantized latent), for a batch of different
    inputs [B, C, T]: `std` (overall) and `spread` (std across the batch, averaged over channels and time,
    the part of the activation that depends on the input). A layer whose spread is far below its std
    outputs nearly the same thing for every input."""
    rows, h = [], wav
    for part, layers in (("encoder", codec.encoder.model), ("decoder", codec.decoder.model)):
        for index, layer in enumerate(layers):
            h = layer(h)
            rows.append({"part": part, "index": index, "layer": f"{part[:3]}.{index} {type(layer).__name__}",
                         "std": float(h.std()), "spread": float(h.std(0).mean())})
    frame = pd.DataFrame(rows)
    frame.insert(0, "position", range(len(frame)))
    return frame.assign(input_std=float(wav.std()))


def curves(metrics: pd.DataFrame) -> pd.DataFrame:
    """The validation rows of a run's metrics.parquet: step, CPU minutes, SI-SDR, mel distance, level-0
    perplexity (held-out windows at the run's valid_bandwidth)."""
    valid = metrics[metrics.split == "valid"]
    return pd.DataFrame({"step": valid.step, "minutes": valid.seconds / 60, "si_sdr": valid.si_sdr,
                         "mel_distance": valid.mel_distance, "perplexity_l0": valid.perplexity_l0}).reset_index(
        drop=True)


def left_plateau(curve: pd.DataFrame, plateau_si_sdr: float = -30.0) -> int | None:
    """First validated step whose SI-SDR is above `plateau_si_sdr` (SEANet's plateau sits near -46 dB
    at 6 kbps), or None if the run never left it."""
    above = curve[curve.si_sdr > plateau_si_sdr]
    return int(above.step.iloc[0]) if len(above) else None


def targets(scores: pd.DataFrame) -> pd.DataFrame:
    """Per row of `scores` (si_sdr, perplexity_l0, mel_distance at 6 kbps), whether each target is met."""
    out = scores.copy()
    for metric, (how, bound) in TARGETS.items():
        value = out[metric]
        out[f"{metric}_ok"] = value > bound if how == "above" else value >= bound if how == "at least" \
            else value <= bound
    out["meets_targets"] = out[[f"{m}_ok" for m in TARGETS]].all(axis=1)
    return out
