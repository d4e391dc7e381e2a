"""The regime map (issue 26): where does a working expiry change the end point, and where only the speed?

One tidy table, results/regimes.csv (`regimes_table`), one row per run x logged step:
* codec runs of the `long` and `regimes` scales, at each scored step (milestones and the end) on the test
  windows at the run's bitrate (`valid_bandwidth`: 6 kbps for 32 levels, 0.9 kbps for one level of 4096);
* quantizer-only runs (results/<scale>/08_regimes/runs/*.parquet: the RVQ alone on a frozen encoder's latents)
  at each held-out evaluation, quality `snr_db` (quantization SNR against the latents' variance).
`dead_codes`: codes below each arm's own threshold after the last logged training step (`none`: EnCodec's 2 of
an EMA count per batch, which most codes are under at 600 frames), so it is not compared across arms.
`end_gaps` pairs `fixed_rel` with `none` seed by seed at each regime's last common step; `steps_to_reach` is the
cost view: how many steps `fixed_rel` needs to reach the quality `none` has at each milestone.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from studylib.analysis import horizon, recipe, reports, stats
from studylib.analysis.records import RunRecord, list_runs
from studylib.core.storage import DamagedFile, read_parquet, warn
from studylib.model.codec import CodecConfig
from studylib.training.columns import study_names

COLUMNS = ["regime", "kind", "scale", "arm", "seed", "run", "step", "bins", "n_q", "frames_per_step", "encoder",
           "bandwidth_kbps", "usage", "perplexity", "dead_codes", "si_sdr_db", "mel_distance", "snr_db", "model",
           "train_steps", "init"]
# the defaults a regime's name leaves out (issues 37, 38: a longer horizon, the init cure, the official model size)
DEFAULT_MODEL, DEFAULT_CODEC_STEPS, FIRST_BATCH = "small", 3000, "first batch"
SCALES = ("long", "regimes")  # the scales of results/regimes.csv
QUANTIZER_DIR = Path("08_regimes") / "runs"  # a scale's quantizer-only cells


def codec_shape(run: RunRecord) -> dict:
    """bins, levels, frames per step and encoder (trained | frozen) of a codec run, from its manifest."""
    cfg = run.manifest.get("config") or {}
    n_q = cfg.get("n_q") or getattr(CodecConfig, cfg.get("model", "small"))().n_q
    return {"bins": int(cfg.get("bins", 1024)), "n_q": int(n_q),
            "frames_per_step": int(run.manifest.get("frames_per_step") or 0),
            "encoder": "frozen" if cfg.get("freeze_encoder") else "trained"}


def codec_setting(run: RunRecord) -> dict:
    """What else sets a codec run's regime apart: its model preset, its training length and its codebook init
    (`first batch`, as EnCodec; or the init cure: an autoencoder warm-up, then k-means on more frames)."""
    cfg = run.manifest.get("config") or {}
    warmup, frames = int(cfg.get("quantizer_warmup") or 0), int(cfg.get("kmeans_frames") or 0)
    init = f"warm-up {warmup}, k-means on {frames}" if warmup or frames else FIRST_BATCH
    return {"model": cfg.get("model", DEFAULT_MODEL), "train_steps": int(cfg.get("steps", 0)), "init": init}


def regime_name(kind: str, bins: int, n_q: int, frames_per_step: int, encoder: str, model: str = DEFAULT_MODEL,
                train_steps: int | None = None, init: str = FIRST_BATCH) -> str:
    """e.g. "codec K=4096 x1 600f trained"; a longer codec horizon, another model or the init cure are added."""
    name = f"{kind} K={bins} x{n_q} {frames_per_step}f {encoder}"
    if kind == "codec" and train_steps and train_steps > DEFAULT_CODEC_STEPS:
        name += f" {train_steps} steps"
    if model != DEFAULT_MODEL:
        name += f" {model}"
    return name + ("" if init == FIRST_BATCH else " init cure")


def codec_rows(run: RunRecord, scale: str) -> list[dict]:
    """One row per scored step of a codec run at its bitrate (the valid_bandwidth it was trained to be scored at)."""
    shape, setting = codec_shape(run), codec_setting(run)
    cfg = run.manifest.get("config") or {}
    kbps = float(cfg.get("valid_bandwidth", 6.0))
    metrics = read_parquet(run.metrics)
    train = metrics[metrics.split == "train"]
    levels_of = [c for c in train.columns if c.startswith("dead_l")]
    evaluations = [(int(cfg.get("steps", 0)), run.eval_items, run.eval_levels)]
    evaluations += [(step, items, levels) for step, (items, levels) in sorted(run.milestone_evals.items())]
    rows = []
    for step, items_path, levels_path in sorted(evaluations, key=lambda e: e[0]):
        items, levels = read_parquet(items_path), read_parquet(levels_path)
        items, levels = items[np.isclose(items.bandwidth, kbps)], levels[np.isclose(levels.bandwidth, kbps)]
        if items.empty:
            continue
        logged = train[train.step <= step].tail(1)  # the EMA dead-code count at the last logged step before
        used_levels = [f"dead_l{level}" for level in sorted(levels.level.unique()) if f"dead_l{level}" in levels_of]
        dead = float(logged[used_levels].mean(axis=1).iloc[0]) if len(logged) and used_levels else math.nan
        rows.append({"regime": regime_name("codec", **shape, **setting), "kind": "codec", "scale": scale,
                     "arm": run.arm, "seed": run.seed, "run": run.name, "step": step, **shape, "bandwidth_kbps": kbps,
                     "usage": levels.usage.mean(), "perplexity": levels.perplexity.mean(), "dead_codes": dead,
                     "si_sdr_db": items.si_sdr.mean(), "mel_distance": items.mel_distance.mean(),
                     "snr_db": math.nan, **setting})
    return rows


def quantizer_rows(table: pd.DataFrame) -> list[dict]:
    """One row per held-out evaluation of one quantizer-only cell (its runs/<cell>.parquet, level 0)."""
    evals, train = table[table.split == "eval"], table[table.split == "train"].set_index("step")
    first = table.iloc[0]
    shape = {"bins": int(first.bins), "n_q": int(first.n_q), "frames_per_step": int(first.frames_per_step),
             "encoder": "frozen"}
    return [{"regime": regime_name("quantizer", **shape), "kind": "quantizer", "scale": "",
             "arm": first.arm, "seed": int(first.seed), "run": first.cell, "step": int(row.step), **shape,
             "bandwidth_kbps": math.nan, "usage": row.usage_l0, "perplexity": row.perplexity_l0,
             "dead_codes": float(train.dead_l0.get(row.step, math.nan)), "si_sdr_db": math.nan,
             "mel_distance": math.nan, "snr_db": row.snr_l0, "model": DEFAULT_MODEL,
             "train_steps": int(table.step.max()), "init": FIRST_BATCH} for row in evals.itertuples()]


def scale_rows(scale_dir: Path) -> list[dict]:
    """The rows of one scale's folder: its evaluated codec runs and its finished quantizer-only cells."""
    rows = []
    if (scale_dir / "runs").is_dir():
        for run in list_runs(scale_dir, evaluated=True):
            try:
                rows += codec_rows(run, scale_dir.name)
            except DamagedFile as e:
                warn(f"skipped the run {run.folder}: {e}")
    for path in sorted((scale_dir / QUANTIZER_DIR).glob("*.parquet")):
        try:
            rows += [{**row, "scale": scale_dir.name} for row in quantizer_rows(read_parquet(path))]
        except DamagedFile as e:
            warn(f"skipped the quantizer cell {path}: {e}")
    return rows


def regimes_table(results: str | Path, scales: tuple[str, ...] = SCALES) -> pd.DataFrame:
    """Every evaluated codec run and finished quantizer-only cell of `scales` under `results`."""
    rows = [row for scale in scales for row in scale_rows(Path(results) / scale)]
    table = pd.DataFrame(rows, columns=COLUMNS).astype({"seed": "Int64", "step": "Int64"})
    return table.sort_values(["kind", "bins", "n_q", "frames_per_step", "encoder", "scale", "arm", "seed", "step"]) \
        .reset_index(drop=True)


def band_table(results: str | Path, scales: tuple[str, ...] = SCALES) -> pd.DataFrame:
    """Issue 38: which band a codec passes. Every codec run of `scales` that kept sub-band scores
    (`evaluate --add-bands`, or `bands` in its evaluation): one row per scored step x band at the run's bitrate
    (`horizon.band_rows`: mean over the test windows of the band's SI-SDR, energy ratio and share), tagged like
    `codec_rows`, its columns in the study's vocabulary (`bandwidth_kbps`, `si_sdr_db`)."""
    frames = []
    for scale in scales:
        if not (Path(results) / scale / "runs").is_dir():
            continue
        for run in list_runs(Path(results) / scale, evaluated=True):
            cfg, shape, setting = run.manifest.get("config") or {}, codec_shape(run), codec_setting(run)
            try:
                bands = horizon.band_rows(run.folder, int(cfg.get("steps", 0)))
            except DamagedFile as e:
                warn(f"skipped the sub-band scores of {run.folder}: {e}")
                continue
            bands = bands[np.isclose(bands.bandwidth.astype(float), float(cfg.get("valid_bandwidth", 6.0)))]
            if len(bands):
                regime = regime_name("codec", **shape, **setting)
                frames.append(study_names(bands).assign(regime=regime, scale=scale, arm=run.arm, seed=run.seed,
                                                        run=run.name, model=setting["model"]))
    columns = ["regime", "model", "scale", "arm", "seed", "run", "step", "bandwidth_kbps", "band", "si_sdr_db",
               "energy_ratio", "energy_share", "windows"]
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)


def band_summary(bands: pd.DataFrame) -> pd.DataFrame:
    """`band_table` per regime, arm, step and band: the mean over seeds of the band's SI-SDR and energy ratio."""
    keys = ["regime", "model", "arm", "step", "band"]
    if bands.empty:
        return pd.DataFrame(columns=[*keys, "si_sdr_db", "energy_ratio", "seeds"])
    return bands.groupby(keys).agg(si_sdr_db=("si_sdr_db", "mean"), energy_ratio=("energy_ratio", "mean"),
                                   seeds=("seed", "nunique")).reset_index()


def quality_column(kind: str) -> str:
    return "si_sdr_db" if kind == "codec" else "snr_db"


def end_gaps(table: pd.DataFrame, arm: str = "fixed_rel", baseline: str = "none",
             metrics: tuple[str, ...] = ("quality", "usage")) -> pd.DataFrame:
    """Per regime and step both arms reached with the same seeds: `arm` minus `baseline`, paired by seed (same
    initial weights and batches), mean and 95 % t-interval. `quality` is SI-SDR for codecs, SNR for quantizers."""
    rows = []
    keys = ["regime", "scale", "kind", "bins", "n_q", "frames_per_step", "encoder", "step"]
    for values, group in table.groupby(keys):
        column = quality_column(group.kind.iloc[0])
        a, b = (group[group.arm == name].set_index("seed") for name in (arm, baseline))
        seeds = sorted(set(a.index) & set(b.index))
        if not seeds:
            continue
        for metric in metrics:
            name = column if metric == "quality" else metric
            gap = stats.paired(a, b, name, seeds)
            rows.append({**dict(zip(keys, values)), "metric": name, "baseline_mean": float(b.loc[seeds, name].mean()),
                         "diff": gap.diff, "ci95": gap.ci95, "paired_seeds": gap.n})
    return pd.DataFrame(rows, columns=[*keys, "metric", "baseline_mean", "diff", "ci95", "paired_seeds"])


def last_gaps(gaps: pd.DataFrame) -> pd.DataFrame:
    """`end_gaps` at each regime's last paired step."""
    last = gaps.groupby(["regime", "scale"]).step.transform("max")
    return gaps[gaps.step == last].reset_index(drop=True)


def crossing(steps: np.ndarray, values: np.ndarray, target: float) -> tuple[float, bool]:
    """First step at which the curve (steps, values) reaches `target`, linearly interpolated between logged steps;
    (first logged step, True) if it is already there at its first point (an upper bound), (NaN, False) if never."""
    above = np.flatnonzero(values >= target)
    if not above.size:
        return math.nan, False
    i = int(above[0])
    if i == 0:
        return float(steps[0]), True
    s0, s1, v0, v1 = steps[i - 1], steps[i], values[i - 1], values[i]
    return float(s0 + (target - v0) / (v1 - v0) * (s1 - s0)), False


def steps_to_reach(curves: pd.DataFrame, milestones: tuple[int, ...] = (500, 1000, 2000, 3000),
                   arm: str = "fixed_rel", baseline: str = "none", metric: str = "si_sdr") -> pd.DataFrame:
    """The cost view, per seed: the step at which `arm`'s curve first reaches the value `baseline`'s curve has
    at each milestone, and the steps saved (milestone minus that). `curves`: horizon.validation_curves rows
    (step, arm, seed, `metric`; validation every 250 steps). `bound`: reached at the arm's first validated step
    already (the saving is at least that)."""
    rows = []
    for seed, group in curves.groupby("seed"):
        a = group[group.arm == arm].sort_values("step")
        b = group[group.arm == baseline].set_index("step")[metric]
        if a.empty or b.empty:
            continue
        for milestone in milestones:
            if milestone not in b.index:
                continue
            target = float(b.loc[milestone])
            reached, bound = crossing(a.step.to_numpy(float), a[metric].to_numpy(float), target)
            rows.append({"seed": int(seed), "milestone": milestone, "baseline_value": target, "arm_step": reached,
                         "steps_saved": milestone - reached, "share_saved": (milestone - reached) / milestone,
                         "bound": bound})
    return pd.DataFrame(rows)


def cost_summary(cost: pd.DataFrame) -> pd.DataFrame:
    """`steps_to_reach` per milestone: mean steps saved and share saved with their 95 % t-intervals over seeds."""
    rows = []
    for milestone, group in cost.groupby("milestone"):
        saved, saved_ci = stats.t_ci95(group.steps_saved.tolist())
        share, share_ci = stats.t_ci95(group.share_saved.tolist())
        rows.append({"milestone": int(milestone), "steps_saved": saved, "steps_saved_ci95": saved_ci,
                     "share_saved": share, "share_saved_ci95": share_ci, "seeds": len(group),
                     "never_reached": int(group.arm_step.isna().sum()), "bounds": int(group.bound.sum())})
    return pd.DataFrame(rows)


def validation_curves_of(results: str | Path, scale: str, regime: str) -> pd.DataFrame:
    """The validation curves (recipe.curves) of one codec regime's runs of one scale, tagged arm and seed."""
    frames = []
    for run in list_runs(Path(results) / scale, evaluated=True):
        if regime_name("codec", **codec_shape(run), **codec_setting(run)) == regime and run.metrics.is_file():
            frames.append(recipe.curves(read_parquet(run.metrics)).assign(arm=run.arm, seed=run.seed, run=run.name))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def verdict(diff: float, half: float, seeds: int) -> str:
    """What a gap says: a resolved difference (its 95 % interval excludes 0), none resolved, or one seed only."""
    if seeds < 2 or not np.isfinite(half):
        return "one seed: no interval"
    if abs(diff) <= half:
        return "no resolved gap"
    return "better end point" if diff > 0 else "worse end point"


def decision_table(last: pd.DataFrame, cost_summary: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per regime (K, levels, frames per step, encoder, training length): the quality and usage gaps at
    the end (`last_gaps`) with their verdict, and the share of steps saved at the last milestone where measured."""
    rows = []
    for (regime, scale), group in last.groupby(["regime", "scale"], sort=False):
        first = group.iloc[0]
        quality = group[group.metric.isin(["si_sdr_db", "snr_db"])].iloc[0]
        usage = group[group.metric == "usage"].iloc[0]
        row = {"regime": regime, "scale": scale, "kind": first.kind, "bins": int(first.bins), "n_q": int(first.n_q),
               "frames_per_step": int(first.frames_per_step), "encoder": first.encoder, "steps": int(first.step),
               "seeds": int(quality.paired_seeds), "quality": quality.metric, "baseline_quality": quality.baseline_mean,
               "quality_gap": quality["diff"], "quality_ci95": quality.ci95, "usage_gap": usage["diff"],
               "usage_ci95": usage.ci95, "verdict": verdict(quality["diff"], quality.ci95, quality.paired_seeds),
               "share_saved": np.nan, "share_saved_ci95": np.nan, "saved_at": np.nan,
               "setting": setting_of(regime)}
        if cost_summary is not None and len(cost_summary) and regime in set(cost_summary.regime):
            at = cost_summary[cost_summary.regime == regime].sort_values("milestone").iloc[-1]
            row.update(share_saved=at.share_saved, share_saved_ci95=at.share_saved_ci95, saved_at=int(at.milestone))
        rows.append(row)
    return pd.DataFrame(rows).sort_values(["kind", "encoder", "bins", "frames_per_step"]).reset_index(drop=True) \
        if rows else pd.DataFrame(rows)


def setting_of(regime: str) -> str:
    """What a regime's name adds to kind, K, levels, frames and encoder (`regime_name`): '10000 steps', 'init
    cure', a model preset; '' for the defaults."""
    return " ".join(regime.split()[5:])


def decision_markdown(decision: pd.DataFrame) -> str:
    """The decision table as markdown (the report's and results/README.md's)."""
    if decision.empty:
        return "_No regime has both arms yet._"
    lines = ["| regime | K x levels | frames/step | encoder | steps | seeds | quality gap (dB) | usage gap | "
             "steps saved | verdict |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in decision.itertuples():
        saved = (f"{reports.format_ci(100 * r.share_saved, 100 * r.share_saved_ci95, 0)} % at {r.saved_at:.0f}"
                 if np.isfinite(r.share_saved) else "–")
        what = "SNR" if r.quality == "snr_db" else "SI-SDR"
        setting = getattr(r, "setting", "")
        setting = setting if isinstance(setting, str) else ""  # read back from decision_table.csv: NaN for none
        kind = f"{r.kind} ({setting})" if setting else r.kind
        lines.append(f"| {kind} | {r.bins} x {r.n_q} | {r.frames_per_step} | {r.encoder} | {r.steps} | {r.seeds} | "
                     f"{what} {reports.format_ci(r.quality_gap, r.quality_ci95, 2)} | "
                     f"{reports.format_ci(r.usage_gap, r.usage_ci95, 2)} | {saved} | {r.verdict} |")
    return "\n".join(lines)


def plot_horizon(table: pd.DataFrame, gaps: pd.DataFrame, regime: str, arm: str = "fixed_rel",
                 baseline: str = "none"):
    """One codec regime over training (issue 37: one codebook of 4096 to 10,000 steps): test SI-SDR and usage at
    every scored step per arm (thin: seeds; thick: mean), and the paired SI-SDR gap `arm` - `baseline` with its
    95 % interval (none with one seed)."""
    import matplotlib.pyplot as plt

    rows = table[table.regime == regime]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for ax, metric, label in zip(axes, ("si_sdr_db", "usage"), ("test SI-SDR (dB)", "usage (test windows)")):
        for name, arm_rows in rows.groupby("arm"):
            for _, seed_rows in arm_rows.groupby("seed"):
                ax.plot(seed_rows.step, seed_rows[metric], color=reports.arm_color(name), lw=0.7, alpha=0.5)
            mean = arm_rows.groupby("step")[metric].mean()
            ax.plot(mean.index, mean.values, "o-", color=reports.arm_color(name), ms=3, label=name)
        ax.set(xlabel="step", ylabel=label, title=label)
        ax.legend()
    gap = gaps[(gaps.regime == regime) & (gaps.metric == "si_sdr_db")].sort_values("step")
    axes[2].plot(gap.step, gap["diff"], "o-", color=reports.arm_color(arm))
    axes[2].fill_between(gap.step, gap["diff"] - gap.ci95.fillna(0), gap["diff"] + gap.ci95.fillna(0),
                         color=reports.arm_color(arm), alpha=0.2)
    axes[2].axhline(0, color="grey", lw=0.8, ls=":")
    seeds = int(gap.paired_seeds.max()) if len(gap) else 0
    axes[2].set(xlabel="step", ylabel="dB", title=f"SI-SDR {arm} - {baseline}, paired ({seeds} seed(s))")
    fig.suptitle(regime)
    fig.tight_layout()
    return fig


def plot_bands(summary: pd.DataFrame):
    """`band_summary` of some regimes: per band (columns), the energy ratio (top: estimate / reference in the band,
    1 = the band's energy passes) and the band's SI-SDR (bottom) against step, one line per regime and arm (solid:
    `fixed_rel`-like arms by colour, the regime by line style)."""
    import matplotlib.pyplot as plt

    bands = sorted(summary.band.unique(), key=lambda b: float(b.split("-")[0]))
    fig, axes = plt.subplots(2, max(len(bands), 1), figsize=(4.6 * max(len(bands), 1), 6.6), squeeze=False)
    styles = dict(zip(sorted(summary.regime.unique()), ("-", "--", ":", "-.")))
    for col, band in zip(axes.T, bands):
        for (regime, arm), rows in summary[summary.band == band].groupby(["regime", "arm"]):
            rows = rows.sort_values("step")
            for ax, metric in zip(col, ("energy_ratio", "si_sdr_db")):
                ax.plot(rows.step, rows[metric], styles.get(regime, "-"), marker="o", ms=3,
                        color=reports.arm_color(arm), label=f"{arm}, {setting_of(regime) or 'small'}")
        col[0].axhline(1.0, color="grey", lw=0.8, ls=":")
        col[0].set(title=f"{band}: energy ratio", xlabel="step", yscale="log")
        col[1].set(title=f"{band}: SI-SDR (dB)", xlabel="step")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    return fig
