"""The claims the reports make, as functions of the tidy tables the runs wrote, so each is unit-tested
rather than computed in a notebook cell:

* `identical_quantizer_runs` / `identical_codec_runs`: EnCodec's expiry (`upstream`) trains to the same
  bits as no expiry (`none`), in the quantizer-only grid (02) and in the codec runs (04);
* `quantizer_final`, `quantizer_summary`: the grid's final held-out scores, and their mean ± 95 % CI over
  seeds (`stats.seed_summary`), keeping the settings (`expiry_threshold`, `expiry_every`) as columns;
* `threshold_interval`: the threshold x interval table of the relative-threshold arm, from those columns;
* `codec_summary`: per arm and bandwidth, mean ± 95 % CI over seeds (over test windows with one seed).
"""

from __future__ import annotations

import pandas as pd

from studylib.analysis import anchors, reports, stats
from studylib.training.columns import study_names

SAME_FRAMES = ("upstream", "none")  # the pair the bug makes identical
# the fixed_rel setting shown beside the other arms (Moshi's threshold 0.1, checked every 5 steps)
HEADLINE_SETTING = {"expiry_threshold": 0.1, "expiry_every": 5}
SETTINGS = ["arm", "expiry_mode", "expiry_threshold", "expiry_every"]  # what tells the grid's variants apart
QUANTIZER_METRICS = ["usage_mean", "snr_last", "replaced_per_100_steps"]


# ------------------------------------------------------------------------------- identical runs


def identical_quantizer_runs(runs: pd.DataFrame, a: str = "upstream", b: str = "none") -> pd.Series:
    """Per (frames_per_step, seed) that both arms ran: whether every logged metric (usage, perplexity, SNR,
    losses) of arm `a` equals arm `b`'s at every logged step of both splits, the counters of expiry
    (replaced*, dead*) aside. Empty when either arm is missing. `runs`: 02's quantizer_runs table."""
    if not {a, b} <= set(runs.arm):
        return pd.Series(dtype=bool, name="identical")
    keys = ["frames_per_step", "seed", "step", "split"]
    drop = ["cell", "arm", "variant", "expiry_mode", "expiry_threshold", "expiry_threshold_kind", "expiry_every"] \
        + [c for c in runs if c.startswith(("replaced", "dead"))]
    left = runs[runs.arm == a].drop(columns=drop, errors="ignore").set_index(keys).sort_index()
    right = runs[runs.arm == b].drop(columns=drop, errors="ignore").set_index(keys).sort_index()
    common = left.index.intersection(right.index)
    same = (left.loc[common].fillna(-1) == right.loc[common].fillna(-1)).all(axis=1)
    return same.groupby(level=[0, 1]).all().rename("identical")


def identical_codec_runs(train: pd.DataFrame, items: pd.DataFrame, a: str = "upstream",
                         b: str = "none") -> bool | None:
    """Whether codec runs of arm `a` and `b` (same seeds) logged identical training metrics (the expiry
    counters, wall times and run names aside) and identical test scores; None when either arm is missing.
    `train`: the runs' metrics.parquet rows (any splits) tagged arm/seed/run; `items`: their eval_test rows."""
    left, right = train[train.arm == a], train[train.arm == b]
    if left.empty or right.empty:
        return None
    cols = [c for c in train.columns if c not in ("arm", "run", "seconds") and not c.startswith("replaced")]
    same_train = left[cols].reset_index(drop=True).equals(right[cols].reset_index(drop=True))
    score_cols = ["item", "bandwidth", "seed", "si_sdr", "mel_distance"]
    same_eval = items[items.arm == a][score_cols].reset_index(drop=True).equals(
        items[items.arm == b][score_cols].reset_index(drop=True))
    return bool(same_train and same_eval)


# ------------------------------------------------------------------------- the quantizer-only grid


def quantizer_rows(runs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """02's quantizer_runs split into held-out rows (+ usage_mean over levels, snr_last: SNR after the last
    level) and training rows (+ replaced_per_step over levels, dead_mean over levels)."""
    eval_rows, train_rows = runs[runs.split == "eval"].copy(), runs[runs.split == "train"].copy()
    eval_rows["usage_mean"] = eval_rows[reports.level_columns(eval_rows, "usage")].mean(axis=1)
    eval_rows["snr_last"] = eval_rows[reports.level_columns(eval_rows, "snr")[-1]]
    train_rows["replaced_per_step"] = train_rows[reports.level_columns(train_rows, "replaced")].sum(axis=1)
    train_rows["dead_mean"] = train_rows[reports.level_columns(train_rows, "dead")].mean(axis=1)
    return eval_rows, train_rows


def quantizer_final(eval_rows: pd.DataFrame, train_rows: pd.DataFrame) -> pd.DataFrame:
    """Each cell's last held-out row, with `replaced_per_100_steps`: the codes its expiry replaced over the
    whole run (all levels) per 100 steps."""
    final = eval_rows[eval_rows.step == eval_rows.groupby("cell").step.transform("max")]
    last = train_rows[train_rows.step == train_rows.groupby("cell").step.transform("max")]
    rate = last[reports.level_columns(last, "replaced_total")].sum(axis=1) / last.step * 100
    return final.merge(pd.DataFrame({"cell": last.cell.to_numpy(), "replaced_per_100_steps": rate.to_numpy()}),
                       on="cell")


def quantizer_summary(final: pd.DataFrame, metrics: list[str] = QUANTIZER_METRICS) -> pd.DataFrame:
    """Mean and 95 % CI over seeds of `metrics` per variant and frames per step, with the settings that tell
    the variants apart (arm, expiry_mode, expiry_threshold, expiry_every) as columns."""
    settings = [c for c in SETTINGS if c in final]
    return stats.seed_summary(final, ["variant", "frames_per_step", *settings], metrics)


def is_headline_variant(frame: pd.DataFrame, arm: str = "fixed_rel") -> pd.Series:
    """Rows of every arm but `arm`, and of `arm` at its headline setting (`HEADLINE_SETTING`)."""
    chosen = (frame.expiry_threshold == HEADLINE_SETTING["expiry_threshold"]) & \
        (frame.expiry_every == HEADLINE_SETTING["expiry_every"])
    return (frame.arm != arm) | chosen


def threshold_interval_grids(summary: pd.DataFrame, arm: str = "fixed_rel") -> list[int]:
    """The frames-per-step settings at which `arm` ran more than one check interval (a table to show)."""
    rel = summary[summary.arm == arm]
    return [int(f) for f in sorted(rel.frames_per_step.unique())
            if rel[rel.frames_per_step == f].expiry_every.nunique() > 1]


def threshold_interval(summary: pd.DataFrame, metric: str, frames_per_step: int,
                       arm: str = "fixed_rel") -> pd.DataFrame:
    """`quantizer_summary`'s mean of `metric` for `arm` at `frames_per_step`: relative threshold (rows) x
    check interval in steps (columns)."""
    rows = summary[(summary.arm == arm) & (summary.frames_per_step == frames_per_step) & (summary.metric == metric)]
    return rows.pivot_table(index="expiry_threshold", columns="expiry_every", values="mean", aggfunc="mean")


# ----------------------------------------------------------------------------------- codec runs


def codec_summary(items: pd.DataFrame, levels: pd.DataFrame, opus: pd.DataFrame | None = None,
                  metrics: tuple[str, ...] = ("si_sdr", "mel_distance", "visqol_audio")) -> pd.DataFrame:
    """Per arm and bandwidth: mean and 95 % CI half-width of `metrics` over seeds (per-seed means over the test
    windows first), over the test windows when there is one seed (`ci_over` says which); the levels'
    usage, perplexity, entropy and bitrate efficiency averaged. Opus (tagged `kbps`: the bitrate spent) is
    added per requested bitrate, its CI over windows. Columns in the study's vocabulary (`training.columns`):
    `bandwidth_kbps`, `si_sdr_db`, `visqol`, each with its `_ci95`."""
    rows = []
    for (arm, bw), group in items.groupby(["arm", "bandwidth"]):
        unit = "seed" if group.seed.nunique() > 1 else "item"
        row = {"arm": arm, "kbps": bw, "ci_over": f"{group[unit].nunique()} {unit}s"}
        for metric in metrics:
            if metric in group:
                row[metric], row[f"{metric}_ci95"] = stats.t_ci95(group.groupby(unit)[metric].mean().tolist())
        lvl = levels[(levels.arm == arm) & (levels.bandwidth == bw)]
        row |= {"usage": lvl.usage.mean(), "perplexity": lvl.perplexity.mean(),
                "entropy_kbps": lvl.entropy_kbps.mean(), "bitrate_efficiency": lvl.bitrate_efficiency.mean(),
                "n_seeds": group.seed.nunique()}
        rows.append(row)
    for _, group in (opus.groupby("bandwidth") if opus is not None else []):
        row = {"arm": "opus", "kbps": round(float(group.kbps.iloc[0]), 2), "ci_over": f"{group.item.nunique()} items"}
        for metric in metrics:
            if metric in group:
                row[metric], row[f"{metric}_ci95"] = stats.t_ci95(group.groupby("item")[metric].mean().tolist())
        rows.append(row)
    return study_names(pd.DataFrame(rows))  # a study table: si_sdr_db, visqol, bandwidth_kbps


def focus_rows(summary: pd.DataFrame, focus_kbps: float) -> pd.DataFrame:
    """`codec_summary` at `focus_kbps`, with every Opus row."""
    return summary[(summary.bandwidth_kbps == focus_kbps) | (summary.arm == "opus")]


def paper_anchor(summary: pd.DataFrame, focus_kbps: float) -> pd.DataFrame:
    """The EnCodec paper's 6 kbps rows (its model and its Opus, on its test set) beside this study's arms at
    `focus_kbps` and the Opus bitrate nearest it: a far anchor (other data, model size and budget)."""
    focus = focus_rows(summary, focus_kbps)
    opus_kbps = focus[focus.arm == "opus"].bandwidth_kbps
    nearest = (opus_kbps - focus_kbps).abs().min() if len(opus_kbps) else None
    paper = [{"system": anchor["system"], "bandwidth_kbps": anchors.ENCODEC_PAPER_KBPS,
              "si_sdr_db": anchor["si_sdr_db"], "visqol": anchor["visqol"], "data": "paper's test set"}
             for anchor in (anchors.ENCODEC_PAPER, anchors.OPUS_PAPER)]
    ours = [{"system": f"this study: {r.arm}", "bandwidth_kbps": r.bandwidth_kbps, "si_sdr_db": r.si_sdr_db,
             "visqol": getattr(r, "visqol", float("nan")), "data": "this corpus, this scale"}
            for r in focus.itertuples() if r.arm != "opus" or abs(r.bandwidth_kbps - focus_kbps) == nearest]
    return pd.DataFrame(paper + ours)


def compare_headline(summary: pd.DataFrame, focus_kbps: float, upstream_is_none: bool | None, runs: int,
                     seeds: list[int], plateau: bool) -> dict:
    """04_compare's summary.json: the identical-runs claim and each arm's scores at `focus_kbps`."""
    at_focus = summary[summary.bandwidth_kbps == focus_kbps].set_index("arm")
    columns = [c for c in ("si_sdr_db", "si_sdr_db_ci95", "mel_distance", "visqol", "usage", "perplexity",
                           "bitrate_efficiency") if c in at_focus]
    return {
        "upstream_identical_to_none": upstream_is_none,
        "focus_kbps": focus_kbps,
        "arms": {arm: {k: (None if pd.isna(v) else float(v)) for k, v in at_focus.loc[arm, columns].items()}
                 for arm in at_focus.index},
        "opus": {f"{r.bandwidth_kbps:g}": {"si_sdr_db": r.si_sdr_db, "visqol": getattr(r, "visqol", None)}
                 for r in summary[summary.arm == "opus"].itertuples()},
        "runs": runs, "seeds": seeds, "codecs_on_initial_plateau": bool(plateau),
    }
