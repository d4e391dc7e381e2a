"""The CPU recipe study (`notebooks/06_cpu_recipe.ipynb`): why a fresh codec ignores its input, and which
departures from EnCodec's recipe make the `cpu`-scale codec learn.

`signal_trace` follows a batch through a fresh codec layer by layer; `VARIANTS` are the recipe pieces,
switched on one at a time and together, each a `TrainConfig` overlay on top of the `cpu` scale with
the `none` arm; `curves` and `targets` turn their runs into the report's tables.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from studylib.core.storage import read_json, read_parquet
from studylib.model.codec import Codec
from studylib.training.columns import study_name
from studylib.training.evaluate import evaluate as evaluate_run
from studylib.training.run_folder import RunFolder
from studylib.training.train import train_run

CHOSEN = "chosen recipe"  # the label of the grid's runs of the recipe itself
# The targets of the recipe (study corpus test split, 6 kbps) and the plateau they are measured against.
TARGETS = {"si_sdr_db": ("above", 0.0), "perplexity_l0": ("at least", 64.0), "mel_distance": ("at most", 4.0)}


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
    """Per row of `scores` (si_sdr_db, perplexity_l0, mel_distance at 6 kbps), whether each target is met."""
    out = scores.copy()
    for metric, (how, bound) in TARGETS.items():
        value = out[metric]
        out[f"{metric}_ok"] = value > bound if how == "above" else value >= bound if how == "at least" \
            else value <= bound
    out["meets_targets"] = out[[f"{m}_ok" for m in TARGETS]].all(axis=1)
    return out


# ------------------------------------------------------------------------------------ the notebook's steps


def train_variant(params: list[str], overrides: dict, run_dir: Path, bandwidth: float, evaluate: dict,
                  manifest: str) -> Path:
    """Train (or resume) one variant, then score its checkpoint on the test windows at `bandwidth` unless
    that was done after the checkpoint was written (ViSQOL off: the variants compare on SI-SDR and mel)."""

    train_run(params, overrides, run_dir)  # a complete variant whose checkpoint is gone is read, not trained again
    scores, checkpoint = run_dir / RunFolder.EVAL_ITEMS, run_dir / RunFolder.CHECKPOINT
    if not scores.is_file() or (checkpoint.is_file() and scores.stat().st_mtime < checkpoint.stat().st_mtime):
        evaluate_run(run_dir, "test", bandwidths=(bandwidth,), manifest=manifest,
                     progress=overrides.get("progress", False), **{**evaluate, "visqol_items": 0})
    return run_dir


def run_curve(run_dir: Path, label: str) -> pd.DataFrame:
    """`curves` of a run folder, labelled, with its seed and thread count (CPU minutes depend on them)."""

    manifest = read_json(run_dir / RunFolder.MANIFEST)
    return curves(read_parquet(run_dir / RunFolder.METRICS)).assign(
        variant=label, seed=manifest["seed"], threads=manifest["threads"])


def test_scores(run_dir: Path, bandwidth: float) -> dict:
    """A run's test-window scores at `bandwidth`: mean SI-SDR and mel distance over windows, level-0
    perplexity of all test frames, mean code usage over the levels (in the study tables' vocabulary)."""

    items = read_parquet(run_dir / RunFolder.EVAL_ITEMS)
    levels = read_parquet(run_dir / RunFolder.EVAL_LEVELS)
    items, levels = items[items.bandwidth == bandwidth], levels[levels.bandwidth == bandwidth]
    return {"si_sdr_db": items.si_sdr.mean(), "mel_distance": items.mel_distance.mean(),
            "perplexity_l0": float(levels[levels.level == 0].perplexity.iloc[0]), "usage_mean": levels.usage.mean()}


def chosen_scores(run_dirs: list[Path], bandwidth: float) -> pd.DataFrame:
    """`test_scores` of the grid's runs of the chosen recipe (one per seed) that have been evaluated."""

    rows = []
    for run_dir in run_dirs:
        if (run_dir / RunFolder.EVAL_ITEMS).is_file():
            manifest = read_json(run_dir / RunFolder.MANIFEST)
            rows.append({"run": run_dir.name, "seed": manifest["seed"], "steps": manifest["config"]["steps"],
                         **test_scores(run_dir, bandwidth)})
    return pd.DataFrame(rows)


def variant_table(variants: dict[str, dict], runs: dict[str, Path], curve: pd.DataFrame, bandwidth: float):
    """One row per variant: its change, the last validation point, the step it left the plateau, and its
    test scores at `bandwidth`."""
    rows = []
    for name, run_dir in runs.items():
        c = curve[curve.variant == name]
        rows.append({"variant": name, "change": variants[name]["change"], "steps": int(c.step.max()),
                     "minutes": c.minutes.max(), "left_plateau": left_plateau(c),
                     **{study_name(f"valid_{k}"): c[k].iloc[-1] for k in ("si_sdr", "mel_distance", "perplexity_l0")},
                     **{f"test_{k}": v for k, v in test_scores(run_dir, bandwidth).items()}})
    return pd.DataFrame(rows)


def plot_curves(curve: pd.DataFrame, bandwidth: float):
    """Validation SI-SDR, mel distance and level-0 perplexity against steps (top) and CPU minutes (bottom);
    the chosen recipe's seeds thick and black, the variants thin."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 7.4))
    names = [v for v in curve.variant.unique() if v != CHOSEN]
    palette = dict(zip(names, plt.get_cmap("tab10").colors))
    for row, x in zip(axes, ("step", "minutes")):
        for ax, metric, scale in zip(row, ("si_sdr", "mel_distance", "perplexity_l0"), ("linear", "linear", "log")):
            for (label, seed), c in curve.groupby(["variant", "seed"], sort=False):
                chosen = label == CHOSEN
                first = seed == curve[curve.variant == label].seed.min()
                ax.plot(c[x], c[metric], "-" if chosen else "o-", lw=2.5 if chosen else 1.2, ms=3, alpha=0.8,
                        color="k" if chosen else palette.get(label), label=label if first else None)
            ax.set(title=f"{metric} (validation, {bandwidth:g} kbps)", yscale=scale,
                   xlabel="CPU minutes" if x == "minutes" else x)
    axes[0][0].legend(fontsize="x-small")
    fig.tight_layout()
    return fig
