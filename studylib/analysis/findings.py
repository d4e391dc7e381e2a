"""The study's findings as files: `results/summary.csv` (tidy, one row per evaluated run x bandwidth, Opus
beside them) and the headline table of `results/README.md`, both computed from what the runs left on disk.

    studylib findings [--results results] [--focus-kbps 6]

`results/README.md` is written by people (claims, caveats, figures); only the block between the
`<!-- headline:start -->` and `<!-- headline:end -->` markers is generated, so the table a reader sees
is the one `summary.csv` holds (a test checks they agree).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from studylib.analysis import anchors, regimes, reports, stats
from studylib.analysis.records import RunRecord, list_runs
from studylib.core import storage
from studylib.core.storage import DamagedFile, read_json, read_parquet, warn
from studylib.training.run_folder import RunFolder

COLUMNS = ["scale", "arm", "seed", "run", "bins", "n_q", "steps", "final", "bandwidth_kbps", "si_sdr_db",
           "mel_distance", "visqol", "usage", "perplexity", "perplexity_l0", "entropy_kbps", "n_items",
           "left_plateau_step", "train_minutes", "payload_kbps", "model", "train_steps", "init"]
# the horizons of the README's headline block: the default scale (500 steps) and the long-horizon scale
HEADLINE_SCALES = ("cpu", "long")
HEADLINE_METRICS = [("si_sdr_db", "SI-SDR (dB)", 2), ("mel_distance", "mel distance", 3), ("visqol", "ViSQOL", 2),
                    ("usage", "code usage", 3), ("perplexity_l0", "level-0 perplexity", 0),
                    ("entropy_kbps", "entropy kbps", 2)]
ARM_ORDER = ["none", "upstream", "fixed_abs2", "fixed_rel", "vqtorch", "dac", "dac_commit16", "simvq", "opus"]
# Issue 20: fix the expiry (fixed_rel), or switch to a quantizer without EMA and expiry? Compared seed by seed with
# these baselines at these bandwidths (those a scale evaluated).
ALTERNATIVES = ("dac", "dac_commit16", "simvq")
ALTERNATIVE_BASELINES = ("none", "fixed_rel")
ALTERNATIVE_KBPS = (1.5, 6.0, 24.0)
HIGHER_IS_BETTER = {"si_sdr_db": True, "mel_distance": False, "visqol": True, "usage": True, "perplexity_l0": True,
                    "entropy_kbps": True}
START, END = "<!-- headline:start -->", "<!-- headline:end -->"
# The EnCodec paper's streamable 24 kHz model at 6 kbps (studylib.analysis.anchors): a far anchor, not a target.
PAPER = {**anchors.ENCODEC_PAPER, "system": anchors.ENCODEC_PAPER_ROW}


def run_rows(run: RunRecord, scale: str) -> list[dict]:
    """One row per bandwidth of one evaluated codec run (`study.list_runs`: eval_test*.parquet, manifest.json):
    its final evaluation (`final` True, `steps` its training length) and each milestone's (`final` False, `steps`
    the milestone's step; no ViSQOL)."""
    manifest = run.manifest
    summary = read_json(run.folder / RunFolder.SUMMARY) or {}
    shape = regimes.codec_shape(run)
    common = {"scale": scale, "arm": run.arm, "seed": run.seed, "run": run.name, "bins": shape["bins"],
              "n_q": shape["n_q"],
              "left_plateau_step": summary.get("left_plateau_step"),
              "train_minutes": (manifest.get("train_seconds") or math.nan) / 60, "payload_kbps": math.nan,
              **regimes.codec_setting(run)}
    evaluations = [((manifest.get("config") or {}).get("steps"), True, run.eval_items, run.eval_levels)]
    evaluations += [(step, False, items, levels) for step, (items, levels) in sorted(run.milestone_evals.items())]
    rows = []
    for steps, final, items_path, levels_path in evaluations:
        items, levels = read_parquet(items_path), read_parquet(levels_path)
        for bw, group in items.groupby("bandwidth"):
            lv = levels[levels.bandwidth == bw]
            rows.append({
                **common, "steps": steps, "final": final, "bandwidth_kbps": float(bw),
                "si_sdr_db": group.si_sdr.mean(), "mel_distance": group.mel_distance.mean(),
                "visqol": group.visqol_audio.mean() if "visqol_audio" in group else math.nan,
                "usage": lv.usage.mean(), "perplexity": lv.perplexity.mean(),
                "perplexity_l0": float(lv[lv.level == 0].perplexity.iloc[0]),
                "entropy_kbps": float(lv.entropy_kbps.iloc[0]), "n_items": int(group.item.nunique()),
            })
    return rows


def opus_rows(path: Path, scale: str) -> list[dict]:
    """Opus on the same windows (results/<scale>/baselines/opus_test.parquet), one row per requested bitrate."""
    if not path.is_file():
        return []
    try:
        opus = read_parquet(path)
    except DamagedFile as e:
        warn(f"skipped the Opus baseline: {e}")
        return []
    return [{"scale": scale, "arm": "opus", "seed": None, "run": "opus", "final": True,
             "bandwidth_kbps": float(kbps),
             "si_sdr_db": g.si_sdr.mean(), "mel_distance": g.mel_distance.mean(),
             "visqol": g.visqol_audio.mean() if "visqol_audio" in g else math.nan, "n_items": int(g.item.nunique()),
             "payload_kbps": g.payload_kbps.mean()} for kbps, g in opus.groupby("bandwidth")]


def summary_table(results: str | Path) -> pd.DataFrame:
    """Every evaluated codec run of every scale under `results`, one row per run x bandwidth, and Opus. A run
    whose files do not read is skipped with a warning naming it."""
    rows = []
    for scale_dir in sorted(p for p in Path(results).iterdir() if p.is_dir() and (p / "runs").is_dir()):
        for run in list_runs(scale_dir, evaluated=True):
            try:
                rows += run_rows(run, scale_dir.name)
            except DamagedFile as e:
                warn(f"skipped the run {run.folder}: {e}")
        rows += opus_rows(scale_dir / "baselines" / "opus_test.parquet", scale_dir.name)
    table = pd.DataFrame(rows, columns=COLUMNS).astype({"seed": "Int64", "steps": "Int64", "final": bool,
                                                         "bins": "Int64", "n_q": "Int64", "train_steps": "Int64"})
    order = {arm: i for i, arm in enumerate(ARM_ORDER)}
    return table.sort_values(["scale", "steps", "bandwidth_kbps", "arm", "seed"], na_position="last",
                             key=lambda c: c.map(order).fillna(99) if c.name == "arm" else c).reset_index(drop=True)


def final_rows(summary: pd.DataFrame, scale: str, focus_kbps: float) -> pd.DataFrame:
    """The codec runs' final evaluations of one scale at one bandwidth (no milestones, no Opus)."""
    return summary[(summary.scale == scale) & (summary.arm != "opus") & (summary.bandwidth_kbps == focus_kbps)
                   & summary.final]


def headline(summary: pd.DataFrame, scale: str, focus_kbps: float = 6.0) -> pd.DataFrame:
    """Per arm at `focus_kbps` of one scale: mean and 95 % CI over seeds of each headline metric (Opus: its
    requested bitrate nearest the focus, CI over test windows is not kept here so none is given)."""
    at = final_rows(summary, scale, focus_kbps)
    rows = []
    for arm in [a for a in ARM_ORDER if a in set(at.arm)] + sorted(set(at.arm) - set(ARM_ORDER)):
        group = at[at.arm == arm]
        row = {"arm": arm, "steps": int(group.steps.max()), "seeds": int(group.seed.nunique())}
        for metric, _, _ in HEADLINE_METRICS:
            row[metric], row[f"{metric}_ci95"] = stats.t_ci95(group[metric].tolist())
        rows.append(row)
    opus = summary[(summary.scale == scale) & (summary.arm == "opus")]
    if len(opus):
        nearest = opus.iloc[(opus.bandwidth_kbps - focus_kbps).abs().argsort().iloc[0]]
        rows.append({"arm": f"opus ({nearest.payload_kbps:.1f} kbps spent)", "seeds": 0,
                     **{m: nearest[m] for m, _, _ in HEADLINE_METRICS if m in nearest and pd.notna(nearest[m])}})
    return pd.DataFrame(rows)


def paired_differences(summary: pd.DataFrame, scale: str, focus_kbps: float = 6.0,
                       baseline: str = "none", ratios: tuple[str, ...] = ()) -> pd.DataFrame:
    """Each arm minus `baseline`, seed by seed (same seed: same initial weights and data order), at
    `focus_kbps`: mean and 95 % CI of the differences (`d_<metric>`), of the ratios arm / baseline of the columns
    `ratios` (`r_<column>`), and how many seeds pair up."""
    at = final_rows(summary, scale, focus_kbps)
    base = at[at.arm == baseline].set_index("seed")
    rows = []
    for arm in [a for a in ARM_ORDER if a in set(at.arm) and a != baseline]:
        other = at[at.arm == arm].set_index("seed")
        seeds = sorted(set(base.index) & set(other.index))
        row = {"arm": arm, "baseline": baseline, "paired_seeds": len(seeds)}
        for metric, _, _ in HEADLINE_METRICS:
            gap = stats.paired(other, base, metric, seeds)
            row[f"d_{metric}"], row[f"d_{metric}_ci95"] = gap.diff, gap.ci95
        for column in ratios:
            gap = stats.paired(other, base, column, seeds, ratio=True)
            row[f"r_{column}"], row[f"r_{column}_ci95"] = gap.diff, gap.ci95
        rows.append(row)
    return pd.DataFrame(rows, columns=_paired_columns(ratios))  # no other arm: an empty table, with its header


def _paired_columns(ratios: tuple[str, ...] = ()) -> list[str]:
    return ["arm", "baseline", "paired_seeds", *(f"{p}{m}{s}" for m, _, _ in HEADLINE_METRICS for p, s in
                                                 (("d_", ""), ("d_", "_ci95"))),
            *(f"r_{c}{s}" for c in ratios for s in ("", "_ci95"))]


def alternatives(summary: pd.DataFrame, scale: str, arms: tuple[str, ...] = ALTERNATIVES,
                 baselines: tuple[str, ...] = ALTERNATIVE_BASELINES,
                 bandwidths: tuple[float, ...] = ALTERNATIVE_KBPS) -> pd.DataFrame:
    """Issue 20's table: each alternative design (`arms`) minus each of `baselines` (no expiry; the fixed expiry),
    paired by seed, at each of `bandwidths` the scale evaluated (nominal bitrates are equal: same levels, 10 bits
    each): `paired_differences`' columns plus `r_train_minutes`, the training's cost as a ratio of minutes (the
    same steps, machine and concurrency in one `make study`). One row per kbps x baseline x arm."""
    at = summary[summary.scale == scale]
    frames = []
    for kbps in [b for b in bandwidths if b in set(at.bandwidth_kbps)]:
        for baseline in baselines:
            diffs = paired_differences(summary, scale, kbps, baseline, ratios=("train_minutes",))
            frames.append(diffs[diffs.arm.isin(arms)].assign(bandwidth_kbps=kbps))
    frames = [f for f in frames if len(f)]
    columns = [*_paired_columns(("train_minutes",)), "bandwidth_kbps"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def _reading(d: float, half: float, higher_is_better: bool) -> str:
    """What a paired difference says: better / worse where its 95 % CI excludes 0."""
    if not math.isfinite(d):
        return "not measured"
    if not math.isfinite(half):
        return "one seed: no interval"
    if abs(d) <= half:
        return "no resolved difference"
    return "better" if (d > 0) == higher_is_better else "worse"


def answer(table: pd.DataFrame, arm: str, kbps: float, versus: str = "fixed_rel") -> str:
    """The issue's question for one alternative at one bitrate, from `alternatives`' table, in one sentence: does
    switching to `arm` beat fixing the expiry (`versus`) on audio quality (SI-SDR and mel distance, paired by
    seed), and what does it do to code use and training time? Says so whichever way the numbers fall."""
    rows = table[(table.arm == arm) & (table.bandwidth_kbps == kbps) & (table.baseline == versus)] \
        if len(table) else table
    if not len(rows):
        return f"{arm} vs {versus} at {kbps:g} kbps: no paired runs"
    row = rows.iloc[0]
    # what the baseline is called in the sentence: a verb phrase and a noun phrase
    doing, thing = {"fixed_rel": ("fixing the expiry", "the fixed expiry"),
                    "none": ("keeping no expiry", "no expiry")}.get(versus, (f"arm {versus}", f"arm {versus}"))
    reading = {m: _reading(row[f"d_{m}"], row[f"d_{m}_ci95"], HIGHER_IS_BETTER[m]) for m, _, _ in HEADLINE_METRICS}
    quality = {reading["si_sdr_db"], reading["mel_distance"]} - {"no resolved difference"}
    if quality & {"one seed: no interval", "not measured"}:
        conclusion = "too few paired seeds for an interval: no verdict on quality"
    elif quality == {"better"}:
        conclusion = f"switching to {arm} beats {doing}"
    elif quality == {"worse"}:
        conclusion = f"{doing} beats switching to {arm}"
    elif quality == {"better", "worse"}:
        conclusion = f"{arm} and {thing} trade SI-SDR against mel distance"
    else:
        conclusion = f"no resolved difference in quality between {arm} and {thing}"
    details = ", ".join(f"{label} {row[f'd_{m}']:+.{digits}f}"
                        + (f" ± {row[f'd_{m}_ci95']:.{digits}f}" if math.isfinite(row[f"d_{m}_ci95"]) else "")
                        + f" ({reading[m]})" for m, label, digits in HEADLINE_METRICS if math.isfinite(row[f"d_{m}"]))
    cost = reports.format_ci(row.r_train_minutes, row.r_train_minutes_ci95, 2) if "r_train_minutes" in row else "–"
    return (f"{arm} vs {versus} at {kbps:g} kbps ({int(row.paired_seeds)} paired seeds): {conclusion}; "
            f"{details}; training time x{cost}")


PAIRED_METRICS = ("si_sdr_db", "mel_distance", "usage", "entropy_kbps")


def paired_over_steps(summary: pd.DataFrame, scale: str, arm: str = "fixed_rel", baseline: str = "none",
                      metrics: tuple[str, ...] = PAIRED_METRICS) -> pd.DataFrame:
    """`arm` minus `baseline` seed by seed at every evaluated step (milestones and final) and bandwidth of one
    scale: one row per (steps, bandwidth, metric) with the mean difference, its 95 % t-interval and the seeds
    that pair up."""
    rows = []
    at = summary[(summary.scale == scale) & summary.arm.isin([arm, baseline])]
    for (steps, bw), group in at.groupby(["steps", "bandwidth_kbps"]):
        a, b = group[group.arm == arm].set_index("seed"), group[group.arm == baseline].set_index("seed")
        seeds = sorted(set(a.index) & set(b.index))
        for metric in metrics:
            gap = stats.paired(a, b, metric, seeds)
            rows.append({"scale": scale, "arm": arm, "baseline": baseline, "steps": int(steps),
                         "bandwidth_kbps": float(bw), "metric": metric, "diff": gap.diff, "ci95": gap.ci95,
                         "paired_seeds": gap.n})
    return pd.DataFrame(rows, columns=["scale", "arm", "baseline", "steps", "bandwidth_kbps", "metric", "diff", "ci95",
                                       "paired_seeds"])


def headline_markdown(summary: pd.DataFrame, scales: tuple[str, ...] = HEADLINE_SCALES,
                      focus_kbps: float = 6.0) -> str:
    """The README's headline table: per scale on disk (each a training length), mean ± 95 % CI over seeds at
    `focus_kbps`, test windows; then Opus on the same windows and the EnCodec paper."""
    scales = (scales,) if isinstance(scales, str) else scales
    head = "| arm | steps | seeds | " + " | ".join(label for _, label, _ in HEADLINE_METRICS) + " |"
    lines = [head, "|" + "---|" * (3 + len(HEADLINE_METRICS))]
    opus = None
    for scale in [s for s in scales if (summary.scale == s).any()]:
        for row in headline(summary, scale, focus_kbps).to_dict("records"):
            if row["arm"].startswith("opus"):
                opus = opus or row
                continue
            cells = [f"`{row['arm']}`", f"{int(row['steps']):,}", str(row["seeds"])]
            for metric, _, digits in HEADLINE_METRICS:
                cells.append(reports.format_ci(row[metric], row[f"{metric}_ci95"], digits))
            lines.append("| " + " | ".join(cells) + " |")
    if opus is not None:
        cells = [opus["arm"], "–", "–"]
        for metric, _, digits in HEADLINE_METRICS:
            value = opus.get(metric, math.nan)
            cells.append(reports.format_ci(value if value is not None else math.nan, math.nan, digits))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"| {PAPER['system']} | – | – | {PAPER['si_sdr_db']:.2f} | – | {PAPER['visqol']:.2f} | – | – | – |")
    return "\n".join(lines)


def update_readme(readme: Path, block: str) -> bool:
    """Replace the generated block of `readme` (between the markers); False if the markers are missing."""
    if not readme.is_file():
        return False
    text = readme.read_text()
    if START not in text or END not in text:
        return False
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    storage.atomic_write(readme, lambda p: p.write_text(f"{before}{START}\n{block}\n{END}{after}"))
    return True


def readme_block(readme: Path) -> str | None:
    """The generated block of `readme` as it stands, or None."""
    text = readme.read_text() if readme.is_file() else ""
    if START not in text or END not in text:
        return None
    return text.split(START, 1)[1].split(END, 1)[0].strip("\n")


def readmes(results: Path) -> list[Path]:
    """The READMEs that carry the headline block: results/README.md and, for the repository's own results
    folder, the project README beside it (only files holding the markers are ever changed)."""
    return [results / "README.md", results.parent / "README.md"]


def write_findings(results: str | Path, scales: tuple[str, ...] = HEADLINE_SCALES, focus_kbps: float = 6.0) -> Path:
    """results/summary.csv from every scale on disk, results/regimes.csv (`regimes.regimes_table`); the headline
    block of the READMEs from `scales`."""
    results = Path(results)
    summary = summary_table(results)
    path = storage.atomic_write(results / "summary.csv", lambda p: summary.to_csv(p, index=False))
    table = regimes.regimes_table(results)
    if len(table):  # the regime map (issue 26): one row per run x logged step of the long and regimes scales
        storage.atomic_write(results / "regimes.csv", lambda p: table.to_csv(p, index=False))
    if summary.scale.isin(scales).any():
        block = headline_markdown(summary, scales, focus_kbps)
        for readme in readmes(results):
            update_readme(readme, block)
    write_equivalence(results, summary)
    return path


def write_equivalence(results: Path, summary: pd.DataFrame, scale: str = "cpu") -> Path | None:
    """results/equivalence/equivalence.csv: `equivalence` of the scale's runs on disk against the rows kept in
    results/equivalence/baseline_*.csv (summary.csv rows of the same runs made before a change of how runs
    execute); None when there is no baseline."""
    folder = results / "equivalence"
    baselines = sorted(folder.glob("baseline_*.csv")) if folder.is_dir() else []
    if not baselines or not (summary.scale == scale).any():
        return None
    tables = [equivalence(pd.read_csv(b), summary[summary.scale == scale]).assign(baseline=b.stem.removeprefix(
        "baseline_")) for b in baselines]
    table = pd.concat(tables, ignore_index=True)
    return storage.atomic_write(folder / "equivalence.csv", lambda p: table.to_csv(p, index=False))


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="studylib findings", description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results", help="results folder (default results)")
    parser.add_argument("--scale", dest="scales", action="append", default=None,
                        help=f"a scale of the README's headline table, repeatable (default {HEADLINE_SCALES})")
    parser.add_argument("--focus-kbps", type=float, default=6.0, help="its bandwidth (default 6)")
    args = parser.parse_args(argv)
    if not Path(args.results).is_dir():
        print(f"studylib findings: {args.results}: no such results folder", file=sys.stderr)
        return 2
    path = write_findings(args.results, tuple(args.scales or HEADLINE_SCALES), args.focus_kbps)
    print(f"wrote {path}")
    return 0


# The speed work's adoption rule (issue 17): a faster execution setting replaces fp32 eager at a scale only if every
# paired difference of these metrics is within its tolerance or its 95 % interval covers 0.
EQUIVALENCE_TOLERANCE = {"si_sdr_db": 0.3, "mel_distance": 0.03}
EQUIVALENCE_METRICS = ("si_sdr_db", "mel_distance", "perplexity_l0", "usage")


def equivalence(baseline: pd.DataFrame, candidate: pd.DataFrame, arms: tuple[str, ...] = ("none", "fixed_rel"),
                bandwidths: tuple[float, ...] = (1.5, 6.0, 24.0),
                metrics: tuple[str, ...] = EQUIVALENCE_METRICS) -> pd.DataFrame:
    """Candidate minus baseline (two sets of summary.csv rows of the same scale, e.g. before and after a change of
    how runs execute), paired by arm and seed, final evaluations only: one row per arm x bandwidth x metric with
    the mean difference, its 95 % t-interval, the seeds that pair up (runs trained again since the baseline:
    a run whose rows equal the baseline's is left out) and, for the metrics with a tolerance
    (`EQUIVALENCE_TOLERANCE`), whether it passes (|difference| within the tolerance, or the interval covers 0)."""
    def finals(frame: pd.DataFrame) -> pd.DataFrame:
        final = frame["final"] if "final" in frame else True
        return frame[(frame.arm.isin(arms)) & final].set_index(["arm", "seed", "bandwidth_kbps"])

    base, cand = finals(baseline), finals(candidate)
    # a run not trained again since the baseline was kept scores exactly as before: no evidence either way
    retrained = {k for k in set(base.index) & set(cand.index)
                 if any(base.loc[k, m] != cand.loc[k, m] for m in metrics if m in base and m in cand)}
    rows = []
    for arm in arms:
        for bw in bandwidths:
            keys = sorted(k for k in retrained if k[0] == arm and k[2] == bw)
            for metric in metrics:
                diff, half = (gap := stats.paired(cand, base, metric, keys)).diff, gap.ci95
                tol = EQUIVALENCE_TOLERANCE.get(metric)
                within = tol is not None and abs(diff) <= tol
                covers = math.isfinite(half) and abs(diff) <= half
                rows.append({"arm": arm, "bandwidth_kbps": bw, "metric": metric, "diff": diff, "ci95": half,
                             "paired_seeds": len(keys), "tolerance": tol, "within_tolerance": within,
                             "ci_covers_zero": covers, "passes": (within or covers) if tol is not None else None})
    return pd.DataFrame(rows)


CURE_METRICS = (("si_sdr_db", "SI-SDR (dB)", 2), ("mel_distance", "mel distance", 3), ("usage", "usage", 2),
                ("entropy_kbps", "entropy kbps", 3))
CURE_BASELINES = ("none", "fixed_rel")


def at_run_bitrate(rows: pd.DataFrame) -> pd.DataFrame:
    """Summary rows of one-level runs at the bitrate each run spends: its lowest scored bandwidth."""
    return rows[np.isclose(rows.bandwidth_kbps, rows.groupby("run").bandwidth_kbps.transform("min"))]


def cure_label(row: pd.Series) -> str:
    """A run's arm with its codebook init when that is the init cure (issue 37: 'none + init cure')."""
    init = row.get("init")
    return row.arm + (" + init cure" if isinstance(init, str) and init != regimes.FIRST_BATCH else "")


def which_cure(summary: pd.DataFrame, scale: str = "regimes", bins: int = 4096, n_q: int = 1,
               steps: int = 3000) -> pd.DataFrame:
    """Issue 37's "which cure" table for one large codebook trained with its codec (the `small` model): every arm
    (and init) of the runs of `steps` steps at its bitrate, mean ± 95 % CI over seeds of SI-SDR, mel distance,
    usage and entropy, and each paired by seed against `none` and `fixed_rel` (first-batch init)."""
    at = summary[(summary.scale == scale) & (summary.bins == bins) & (summary.n_q == n_q) & summary.final
                 & (summary.train_steps == steps) & (summary.model == regimes.DEFAULT_MODEL)]
    at = at_run_bitrate(at).copy()
    at["label"] = [cure_label(row) for _, row in at.iterrows()]
    rows = []
    for label, group in at.groupby("label", sort=False):
        row = {"arm": label, "seeds": int(group.seed.nunique()), "steps": steps}
        for metric, _, _ in CURE_METRICS:
            row[metric], row[f"{metric}_ci95"] = stats.t_ci95(group[metric].tolist())
        for baseline in CURE_BASELINES:
            base = at[at.label == baseline].set_index("seed")
            for metric, _, _ in CURE_METRICS:
                gap = stats.paired(group.set_index("seed"), base, metric)
                row[f"vs_{baseline}_{metric}"], row[f"vs_{baseline}_{metric}_ci95"] = gap.diff, gap.ci95
            row[f"vs_{baseline}_seeds"] = gap.n
        rows.append(row)
    order = {name: i for i, name in enumerate(["none", "fixed_rel", "none + init cure", "fixed_rel + init cure",
                                               "dac_commit16", "simvq"])}
    table = pd.DataFrame(rows)
    return table.sort_values("arm", key=lambda c: c.map(order).fillna(99)).reset_index(drop=True) if rows else table


def which_cure_markdown(table: pd.DataFrame) -> str:
    """`which_cure` as markdown: each metric as mean ± CI, then the SI-SDR and usage gaps to none and fixed_rel."""
    if table.empty:
        return "_No run of this shape yet._"
    head = ["arm", "seeds", *(label for _, label, _ in CURE_METRICS), "SI-SDR vs none", "SI-SDR vs fixed_rel",
            "usage vs none", "usage vs fixed_rel"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table.to_dict("records"):
        cells = [f"`{r['arm']}`", str(r["seeds"]),
                 *(reports.format_ci(r[m], r[f"{m}_ci95"], d) for m, _, d in CURE_METRICS)]
        for metric in ("si_sdr_db", "usage"):
            for baseline in CURE_BASELINES:
                same = r["arm"] == baseline
                cells.append("–" if same or not r[f"vs_{baseline}_seeds"] else
                             reports.format_ci(r[f"vs_{baseline}_{metric}"], r[f"vs_{baseline}_{metric}_ci95"],
                                               2) + f" ({r[f'vs_{baseline}_seeds']})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


ARCHITECTURE_METRICS = (("si_sdr_db", "SI-SDR (dB)", 2), ("usage", "usage", 2), ("entropy_kbps", "entropy kbps", 3))


def architecture_table(summary: pd.DataFrame, scale: str = "regimes", bins: int = 4096, n_q: int = 1,
                       steps: int = 3000, arm: str = "fixed_rel", baseline: str = "none") -> pd.DataFrame:
    """Issue 38: the same single codebook in each model preset, at every scored step of the runs trained `steps`
    steps with the first-batch init: per model and step, each arm's mean over seeds of SI-SDR, usage and entropy
    (at the run's bitrate) and `arm` - `baseline` paired by seed with its 95 % interval. One row per model x step."""
    at = summary[(summary.scale == scale) & (summary.bins == bins) & (summary.n_q == n_q)
                 & (summary.train_steps == steps) & (summary.init == regimes.FIRST_BATCH)
                 & summary.arm.isin([arm, baseline])]
    at = at_run_bitrate(at)
    rows = []
    for (model, step), group in at.groupby(["model", "steps"]):
        a, b = group[group.arm == arm].set_index("seed"), group[group.arm == baseline].set_index("seed")
        row = {"model": model, "steps": int(step), "bandwidth_kbps": float(group.bandwidth_kbps.iloc[0])}
        for metric, _, _ in ARCHITECTURE_METRICS:
            gap = stats.paired(a, b, metric)
            row |= {f"{baseline}_{metric}": b[metric].mean(), f"{arm}_{metric}": a[metric].mean(),
                    f"gap_{metric}": gap.diff, f"gap_{metric}_ci95": gap.ci95, "paired_seeds": gap.n}
        rows.append(row)
    return pd.DataFrame(rows)


def architecture_markdown(table: pd.DataFrame, arm: str = "fixed_rel", baseline: str = "none") -> str:
    """`architecture_table` as markdown: per model and step, both arms and the paired gap of each metric."""
    if table.empty:
        return "_No run of this shape yet._"
    head = ["model", "steps", "seeds", *(f"{label}: {baseline} / {arm} / gap" for _, label, _ in ARCHITECTURE_METRICS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table.to_dict("records"):
        cells = [f"`{r['model']}`", f"{r['steps']:,}", str(r["paired_seeds"])]
        for metric, _, digits in ARCHITECTURE_METRICS:
            gap = reports.format_ci(r[f"gap_{metric}"], r[f"gap_{metric}_ci95"], digits)
            cells.append(f"{r[f'{baseline}_{metric}']:.{digits}f} / {r[f'{arm}_{metric}']:.{digits}f} / {gap}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
