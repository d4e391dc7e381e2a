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

import pandas as pd

from studylib import reports, storage
from studylib.storage import DamagedFile, read_json, read_parquet, warn
from studylib.study import Run, list_runs

COLUMNS = ["scale", "arm", "seed", "run", "bandwidth_kbps", "si_sdr_db", "mel_distance", "visqol", "usage",
           "perplexity", "perplexity_l0", "entropy_kbps", "n_items", "steps", "left_plateau_step", "train_minutes",
           "payload_kbps"]
HEADLINE_METRICS = [("si_sdr_db", "SI-SDR (dB)", 2), ("mel_distance", "mel distance", 3), ("visqol", "ViSQOL", 2),
                    ("usage", "code usage", 3), ("perplexity_l0", "level-0 perplexity", 0),
                    ("entropy_kbps", "entropy kbps", 2)]
ARM_ORDER = ["none", "upstream", "fixed_abs2", "fixed_rel", "vqtorch", "opus"]
START, END = "<!-- headline:start -->", "<!-- headline:end -->"
# The EnCodec paper's streamable 24 kHz model at 6 kbps (Défossez et al. 2022, table 1): a far anchor on
# other data with a far larger model, not a target.
PAPER = {"system": "EnCodec paper, 24 kHz streamable (other data, GPU-days)", "si_sdr_db": 6.67, "visqol": 4.35}


def run_rows(run: Run, scale: str) -> list[dict]:
    """One row per bandwidth of one evaluated codec run (`study.list_runs`: eval_test*.parquet, manifest.json)."""
    manifest = run.manifest
    summary = read_json(run.folder / "summary.json") or {}
    items = read_parquet(run.eval_items)
    levels = read_parquet(run.eval_levels)
    rows = []
    for bw, group in items.groupby("bandwidth"):
        lv = levels[levels.bandwidth == bw]
        rows.append({
            "scale": scale, "arm": run.arm, "seed": run.seed,
            "run": run.name, "bandwidth_kbps": float(bw), "si_sdr_db": group.si_sdr.mean(),
            "mel_distance": group.mel_distance.mean(),
            "visqol": group.visqol_audio.mean() if "visqol_audio" in group else math.nan,
            "usage": lv.usage.mean(), "perplexity": lv.perplexity.mean(),
            "perplexity_l0": float(lv[lv.level == 0].perplexity.iloc[0]),
            "entropy_kbps": float(lv.entropy_kbps.iloc[0]),
            "n_items": int(group.item.nunique()), "steps": (manifest.get("config") or {}).get("steps"),
            "left_plateau_step": summary.get("left_plateau_step"),
            "train_minutes": (manifest.get("train_seconds") or math.nan) / 60, "payload_kbps": math.nan,
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
    return [{"scale": scale, "arm": "opus", "seed": None, "run": "opus", "bandwidth_kbps": float(kbps),
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
    table = pd.DataFrame(rows, columns=COLUMNS).astype({"seed": "Int64"})
    order = {arm: i for i, arm in enumerate(ARM_ORDER)}
    return table.sort_values(["scale", "bandwidth_kbps", "arm", "seed"], key=lambda c: c.map(order).fillna(99)
                             if c.name == "arm" else c).reset_index(drop=True)


def headline(summary: pd.DataFrame, scale: str, focus_kbps: float = 6.0) -> pd.DataFrame:
    """Per arm at `focus_kbps` of one scale: mean and 95 % CI over seeds of each headline metric (Opus: its
    requested bitrate nearest the focus, CI over test windows is not kept here so none is given)."""
    at = summary[(summary.scale == scale) & (summary.arm != "opus") & (summary.bandwidth_kbps == focus_kbps)]
    rows = []
    for arm in [a for a in ARM_ORDER if a in set(at.arm)] + sorted(set(at.arm) - set(ARM_ORDER)):
        group = at[at.arm == arm]
        row = {"arm": arm, "seeds": int(group.seed.nunique())}
        for metric, _, _ in HEADLINE_METRICS:
            row[metric], row[f"{metric}_ci95"] = reports.t_ci95(group[metric].tolist())
        rows.append(row)
    opus = summary[(summary.scale == scale) & (summary.arm == "opus")]
    if len(opus):
        nearest = opus.iloc[(opus.bandwidth_kbps - focus_kbps).abs().argsort().iloc[0]]
        rows.append({"arm": f"opus ({nearest.payload_kbps:.1f} kbps spent)", "seeds": 0,
                     **{m: nearest[m] for m, _, _ in HEADLINE_METRICS if m in nearest and pd.notna(nearest[m])}})
    return pd.DataFrame(rows)


def paired_differences(summary: pd.DataFrame, scale: str, focus_kbps: float = 6.0,
                       baseline: str = "none") -> pd.DataFrame:
    """Each arm minus `baseline`, seed by seed (same seed: same initial weights and data order), at
    `focus_kbps`: mean and 95 % CI of the differences, and how many seeds pair up."""
    at = summary[(summary.scale == scale) & (summary.arm != "opus") & (summary.bandwidth_kbps == focus_kbps)]
    base = at[at.arm == baseline].set_index("seed")
    rows = []
    for arm in [a for a in ARM_ORDER if a in set(at.arm) and a != baseline]:
        other = at[at.arm == arm].set_index("seed")
        seeds = sorted(set(base.index) & set(other.index))
        row = {"arm": arm, "baseline": baseline, "paired_seeds": len(seeds)}
        for metric, _, _ in HEADLINE_METRICS:
            diffs = [other.loc[s, metric] - base.loc[s, metric] for s in seeds]
            row[f"d_{metric}"], row[f"d_{metric}_ci95"] = reports.t_ci95(diffs)
        rows.append(row)
    return pd.DataFrame(rows)


def headline_markdown(summary: pd.DataFrame, scale: str, focus_kbps: float = 6.0) -> str:
    """The README's headline table: mean ± 95 % CI over seeds at `focus_kbps`, test windows."""
    table = headline(summary, scale, focus_kbps)
    head = "| arm | seeds | " + " | ".join(label for _, label, _ in HEADLINE_METRICS) + " |"
    lines = [head, "|" + "---|" * (2 + len(HEADLINE_METRICS))]
    for row in table.to_dict("records"):
        cells = [f"`{row['arm']}`" if not row["arm"].startswith("opus") else row["arm"], str(row["seeds"] or "–")]
        for metric, _, digits in HEADLINE_METRICS:
            mean, half = row.get(metric, math.nan), row.get(f"{metric}_ci95", math.nan)
            cells.append(reports.format_ci(mean if mean is not None else math.nan,
                                           half if half is not None else math.nan, digits))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"| {PAPER['system']} | – | {PAPER['si_sdr_db']:.2f} | – | {PAPER['visqol']:.2f} | – | – | – |")
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


def write_findings(results: str | Path, scale: str = "cpu", focus_kbps: float = 6.0) -> Path:
    """results/summary.csv from every scale on disk; the headline block of the READMEs from `scale`."""
    results = Path(results)
    summary = summary_table(results)
    path = storage.atomic_write(results / "summary.csv", lambda p: summary.to_csv(p, index=False))
    if (summary.scale == scale).any():
        block = headline_markdown(summary, scale, focus_kbps)
        for readme in readmes(results):
            update_readme(readme, block)
    return path


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="studylib findings", description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results", help="results folder (default results)")
    parser.add_argument("--scale", default="cpu", help="the scale of the README's headline table (default cpu)")
    parser.add_argument("--focus-kbps", type=float, default=6.0, help="its bandwidth (default 6)")
    args = parser.parse_args(argv)
    if not Path(args.results).is_dir():
        print(f"studylib findings: {args.results}: no such results folder", file=sys.stderr)
        return 2
    path = write_findings(args.results, args.scale, args.focus_kbps)
    print(f"wrote {path}")
    return 0
