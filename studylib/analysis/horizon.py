"""The long-horizon study (notebooks/07_long_horizon): what a working expiry leaves at convergence.

The long scale trains `none` and `fixed_rel` with the cpu recipe for N steps, keeps checkpoints at milestones and
scores each on the test windows (`studylib.training.evaluate.evaluate_milestones`); `studylib.analysis.findings` turns
them into
rows of results/summary.csv (`steps`, `final`) and paired differences over training (`paired_over_steps`). Here:
the validation curves and how fast they still rise, the paired-difference figure, the per-source table at N,
and a sub-band SI-SDR that says in which frequency band a source's waveform error lives.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch

from studylib.analysis import recipe, reports, stats
from studylib.analysis.anchors import ENCODEC_PAPER
from studylib.analysis.records import RunRecord
from studylib.core.storage import read_parquet, warn, write_parquet
from studylib.model.codec import SAMPLE_RATE
from studylib.training.columns import study_name, study_names
from studylib.training.evaluate import band_scores, eval_windows, evaluation_files
from studylib.training.run_folder import RunFolder, load_checkpoint

PAIRED_PANELS = (("si_sdr_db", 1.5), ("si_sdr_db", 6.0), ("si_sdr_db", 24.0), ("mel_distance", 1.5),
                 ("mel_distance", 6.0), ("mel_distance", 24.0), ("usage", 6.0), ("entropy_kbps", 6.0))


def validation_curves(runs: Sequence[RunRecord]) -> pd.DataFrame:
    """Every run's validation rows (step, minutes, SI-SDR, mel distance, level-0 perplexity), tagged arm and seed."""
    frames = [recipe.curves(pd.read_parquet(r.metrics)).assign(arm=r.arm, seed=r.seed, run=r.name)
              for r in runs if r.metrics.is_file()]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def gains(curves: pd.DataFrame, window: int = 500, metric: str = "si_sdr") -> pd.DataFrame:
    """How much `metric` still rises: per arm and seed, its change over each `window` steps ending at a validated
    step that is a multiple of `window` (from the validation curve), then the mean and 95 % CI over seeds."""
    rows = []
    for (arm, seed), run in curves.groupby(["arm", "seed"]):
        by_step = run.set_index("step")[metric]
        for end in by_step.index[(by_step.index % window == 0) & (by_step.index >= 2 * window)]:
            if end - window in by_step.index:
                rows.append({"arm": arm, "seed": seed, "to_step": int(end),
                             "gain": float(by_step[end] - by_step[end - window])})
    per_seed = pd.DataFrame(rows, columns=["arm", "seed", "to_step", "gain"])  # empty: still the header
    gain = f"{study_name(metric)}_gain"  # a study table: si_sdr_db_gain
    return stats.seed_summary(per_seed, ["arm", "to_step"], ["gain"]).rename(columns={"mean": gain})


def plot_paired_over_steps(paired: pd.DataFrame, panels: Sequence[tuple[str, float]] = PAIRED_PANELS):
    """`findings.paired_over_steps`: the paired difference (arm - baseline) against training step, one panel per
    (metric, bandwidth), mean over seeds with its 95 % band; 0 dotted."""
    import matplotlib.pyplot as plt

    have = set(zip(paired.metric, paired.bandwidth_kbps)) if len(paired) else set()
    panels = [panel for panel in panels if panel in have] or sorted(have)  # e.g. the smoke model's 1.5 / 3 kbps
    cols = 3
    rows = max(1, -(-len(panels) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.1 * rows), squeeze=False)
    for ax, (metric, kbps) in zip(axes.flat, panels):
        at = paired[(paired.metric == metric) & (paired.bandwidth_kbps == kbps)].sort_values("steps")
        band = at.ci95.fillna(0)
        ax.plot(at.steps, at["diff"], "o-", color=reports.arm_color(at.arm.iloc[0]) if len(at) else None)
        ax.fill_between(at.steps, at["diff"] - band, at["diff"] + band, alpha=0.25,
                        color=reports.arm_color(at.arm.iloc[0]) if len(at) else None)
        ax.axhline(0, color="grey", ls=":", lw=1)
        title = f"{metric.replace('_', ' ')} at {kbps:g} kbps"
        ax.set(title=title, xlabel="training step")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if len(paired):
        fig.suptitle(f"{paired.arm.iloc[0]} - {paired.baseline.iloc[0]}, paired by seed (95 % CI over "
                     f"{int(paired.paired_seeds.max())} seeds)", y=1.0)
    fig.tight_layout()
    return fig


def per_source(items: pd.DataFrame, opus: pd.DataFrame | None = None,
               metrics: Sequence[str] = ("si_sdr", "mel_distance")) -> pd.DataFrame:
    """Per arm, source and bandwidth: the mean over seeds of each seed's mean over the source's windows (Opus:
    over windows), `items` being eval_test tables tagged arm and seed (`study.run_tables`). A study table: its
    columns are named as `training.columns` says (`bandwidth_kbps`, `si_sdr_db`)."""
    per_seed = items.groupby(["arm", "source", "bandwidth", "seed"])[list(metrics)].mean().reset_index()
    table = per_seed.groupby(["arm", "source", "bandwidth"])[list(metrics)].mean().reset_index()
    table["seeds"] = per_seed.groupby(["arm", "source", "bandwidth"]).seed.nunique().to_numpy()
    if opus is not None and len(opus):
        o = opus.groupby(["source", "bandwidth"])[list(metrics)].mean().reset_index().assign(arm="opus", seeds=0)
        table = pd.concat([table, o], ignore_index=True)
    return study_names(table)


# a run's band_scores at its final checkpoint, kept beside its other tables (and committed with them): the file an
# evaluation with `bands` writes (`evaluate.evaluation_files`), and 07's cache for runs evaluated without
BANDS_FILE = evaluation_files(".", "test", bands=True)[-1].name


def band_rows(run_folder: str | Path, final_step: int) -> pd.DataFrame:
    """Per step (each milestone's eval_test_step<N>_bands.parquet, and the final checkpoint's BANDS_FILE at
    `final_step`) x bandwidth x band of a run: the mean over its windows of the sub-band SI-SDR, the energy ratio
    (estimate / reference in the band: ~0 a band the codec drops, ~1 one it passes) and the reference's energy share.
    Empty when the run kept no sub-band scores."""
    folder, frames = Path(run_folder), []
    for path in sorted(folder.glob("eval_test*_bands.parquet")):
        found = re.fullmatch(r"eval_test(?:_step(\d+))?_bands\.parquet", path.name)  # the final one's, a milestone's
        if found:
            frames.append(read_parquet(path).assign(step=int(found[1]) if found[1] else final_step))
    if not frames:
        return pd.DataFrame(columns=["step", "bandwidth", "band", "si_sdr", "energy_ratio", "energy_share", "windows"])
    table = pd.concat(frames, ignore_index=True)
    rows = table.groupby(["step", "bandwidth", "band"]).agg(
        si_sdr=("si_sdr", "mean"), energy_ratio=("energy_ratio", "mean"), energy_share=("energy_share", "mean"),
        windows=("item", "nunique"))
    return rows.reset_index()


def cached_band_scores(run_folder: str | Path, manifest: str | Path, sources: Sequence[str],
                       bandwidths: Sequence[float], per_kind: int | None = None) -> pd.DataFrame:
    """`band_scores` of a run, kept in its folder (BANDS_FILE): computed from its checkpoint when the file is
    missing, older than the checkpoint or lacks a source or bandwidth asked for; read from the file otherwise.
    Checkpoints stay out of git, so a fresh checkout re-renders 07 from the files. Neither: empty, with a warning."""

    folder = Path(run_folder)
    path, checkpoint = folder / BANDS_FILE, folder / RunFolder.CHECKPOINT
    kept = read_parquet(path) if path.is_file() else None
    if kept is not None and set(sources) <= set(kept.source):
        # with a checkpoint at hand, a newer checkpoint or a bandwidth the file lacks is computed again
        stale = checkpoint.is_file() and (checkpoint.stat().st_mtime > path.stat().st_mtime
                                          or not set(bandwidths) <= set(kept.bandwidth))
        if not stale:
            return kept[kept.source.isin(list(sources)) & kept.bandwidth.isin(list(bandwidths))].reset_index(drop=True)
    if not checkpoint.is_file():
        warn(f"{folder}: no {BANDS_FILE} for these sources and no checkpoint.pt to compute it from; "
             "its sub-band SI-SDR is left out")
        return pd.DataFrame()
    codec, _, _ = load_checkpoint(folder)
    scores = band_scores(codec, manifest, "test", per_kind=per_kind, bandwidths=tuple(bandwidths),
                         sources=list(sources))
    write_parquet(scores, path)
    return scores


def low_frequency_share(manifest: str | Path, split: str = "test", per_kind: int | None = None, cutoff: float = 1000.0,
                        seconds: float = 5.0) -> pd.DataFrame:
    """Per source of a split's windows: the mean share of energy below `cutoff` Hz and the spectral centroid."""

    dataset, info = eval_windows(manifest, split, seconds, per_kind)
    rows = []
    for item, source in zip(info["item"], info["source"]):
        x = dataset[int(item)][0].double()
        power = torch.fft.rfft(x).abs().pow(2)
        freqs = torch.fft.rfftfreq(x.shape[-1], 1 / SAMPLE_RATE).double()
        rows.append({"source": source, "low_share": float(power[freqs < cutoff].sum() / power.sum()),
                     "centroid_hz": float((freqs * power).sum() / power.sum())})
    return pd.DataFrame(rows).groupby("source").mean().reset_index()


def targets(summary: pd.DataFrame, arms: Sequence[str], focus_kbps: float = 6.0, low: float = 1.5,
            high: float = 24.0, rise_db: float = 4.0) -> pd.DataFrame:
    """The long study's targets per arm at its final step (mean over seeds; `summary`: one scale's rows of
    results/summary.csv): beats Opus at `focus_kbps` on SI-SDR and on mel distance, SI-SDR at `high` kbps at least
    `rise_db` above `low` kbps, and the EnCodec paper's SI-SDR. NaN / None where a bandwidth was not evaluated."""

    final = summary[summary.final & (summary.arm != "opus")]
    mean = final.groupby(["arm", "bandwidth_kbps"])[["si_sdr_db", "mel_distance"]].mean()
    opus = summary[(summary.arm == "opus") & (summary.bandwidth_kbps == focus_kbps)]
    opus_si, opus_mel = opus.si_sdr_db.mean(), opus.mel_distance.mean()

    def get(arm: str, kbps: float, metric: str) -> float:
        return mean[metric].get((arm, kbps), float("nan"))

    rows = []
    for arm in arms:
        si, mel = get(arm, focus_kbps, "si_sdr_db"), get(arm, focus_kbps, "mel_distance")
        rise = get(arm, high, "si_sdr_db") - get(arm, low, "si_sdr_db")
        steps = final[final.arm == arm].steps
        rows.append({"arm": arm, "steps": int(steps.max()) if len(steps) else None,
                     f"si_sdr_{focus_kbps:g}kbps": si, f"mel_{focus_kbps:g}kbps": mel,
                     "opus_si_sdr": opus_si, "opus_mel": opus_mel, "beats_opus_si_sdr": bool(si > opus_si),
                     "beats_opus_mel": bool(mel < opus_mel), f"si_sdr_{high:g}_minus_{low:g}": rise,
                     f"rises_{rise_db:g}db": bool(rise >= rise_db),
                     "reaches_paper": bool(si >= ENCODEC_PAPER["si_sdr_db"])})
    return pd.DataFrame(rows)
