"""What the notebooks share: writing tables, figures and JSON to disk, seed statistics, common plots.

Notebooks stay thin: they call studylib for the numbers and these helpers to put every result in a file
(`results/...`), so nothing lives only in a notebook's outputs.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from studylib.analysis.stats import t_ci95  # noqa: F401  (notebooks call reports.t_ci95; defined in stats)
from studylib.core.storage import atomic_write, read_json, write_json, write_parquet  # noqa: F401  (notebooks use them here)

KBPS_TICKS = (0.75, 1.5, 3.0, 6.0, 12.0, 24.0, 48.0)
CSV_MAX_ROWS = 5000  # tables up to this size are also written as CSV, for readers without pyarrow
STYLE = {"dpi": 110, "figsize": (7.5, 4.0)}
# One colour per arm, the same in every figure of every report.
ARM_COLORS = {
    "upstream": "#d62728", "none": "#7f7f7f", "fixed_abs2": "#ff7f0e", "fixed_rel": "#2ca02c",
    "vqtorch": "#1f77b4", "dac": "#8c564b", "dac_commit16": "#c49c94", "simvq": "#e377c2", "opus": "#9467bd",
}


def save_table(frame: pd.DataFrame, out_dir: str | Path, name: str) -> Path:
    """`out_dir/name.parquet` (and `name.csv` when small); returns the parquet path."""
    out_dir = Path(out_dir)
    if len(frame) <= CSV_MAX_ROWS:
        atomic_write(out_dir / f"{name}.csv", lambda p: frame.to_csv(p, index=False))
    return write_parquet(frame, out_dir / f"{name}.parquet")


def save_figure(fig: Any, out_dir: str | Path, name: str) -> Path:
    """`out_dir/name.png`; the figure stays open so the notebook still shows it inline."""
    return atomic_write(Path(out_dir) / f"{name}.png",
                         lambda p: fig.savefig(p, dpi=STYLE["dpi"], bbox_inches="tight", format="png"))


def setup_plots() -> None:
    """One look for every report (call once at the top of a notebook)."""
    import matplotlib as mpl
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    mpl.rcParams.update({"figure.dpi": STYLE["dpi"], "figure.figsize": STYLE["figsize"],
                         "axes.titlesize": "medium", "legend.fontsize": "small"})


# -------------------------------------------------------------------------------------- statistics


def format_ci(mean: float, half: float, digits: int = 2) -> str:
    """'m ± h' or just 'm' where the interval is undefined."""
    if not np.isfinite(mean):
        return "–"
    return f"{mean:.{digits}f}" if not np.isfinite(half) else f"{mean:.{digits}f} ± {half:.{digits}f}"


def level_columns(frame: pd.DataFrame, prefix: str) -> list[str]:
    """`prefix_l0, prefix_l1, ...` present in `frame`, in level order."""
    cols = [c for c in frame.columns if c.startswith(f"{prefix}_l") and c[len(prefix) + 2:].isdigit()]
    return sorted(cols, key=lambda c: int(c[len(prefix) + 2:]))


def per_level_long(frame: pd.DataFrame, prefix: str, id_vars: Sequence[str]) -> pd.DataFrame:
    """Wide `prefix_l{i}` columns -> long rows (id_vars..., level, prefix)."""
    cols = level_columns(frame, prefix)
    long = frame[[*id_vars, *cols]].melt(id_vars=list(id_vars), value_vars=cols, var_name="level",
                                         value_name=prefix)
    long["level"] = long["level"].str.rsplit("_l", n=1).str[1].astype(int)
    return long.dropna(subset=[prefix])


def arm_color(arm: str) -> str | None:
    """The arm's colour; a variant label ("fixed_rel th=0.1 every=5") takes its arm's."""
    return ARM_COLORS.get(str(arm).split()[0])


# ------------------------------------------------------------------------------------------- plots


def plot_training(metrics: pd.DataFrame, terms: Sequence[str] = ("loss", "mel", "l1", "commit")):
    """Loss terms over steps, train (thin) and validation (markers), one panel per term."""
    import matplotlib.pyplot as plt

    terms = [t for t in terms if t in metrics]
    fig, axes = plt.subplots(1, len(terms), figsize=(3.2 * len(terms), 3.0), squeeze=False)
    for ax, term in zip(axes[0], terms):
        for split, style in (("train", {"lw": 1.0}), ("valid", {"marker": "o", "lw": 1.5})):
            rows = metrics[metrics.split == split].dropna(subset=[term])
            if len(rows):
                ax.plot(rows.step, rows[term], label=split, **style)
        ax.set(title=term, xlabel="step")
    axes[0][0].legend()
    fig.tight_layout()
    return fig


def plot_arms_training(metrics: pd.DataFrame, arms: Sequence[str]):
    """Codec runs of several arms during training (`metrics`: their metrics.parquet rows tagged arm, mean over
    seeds): codes used in the batch at level 0, dead codes (mean over levels, each arm's own threshold) and the
    validation loss; `upstream` dashed (it draws `none`'s line)."""
    import matplotlib.pyplot as plt

    train = metrics[metrics.split == "train"].copy()
    train["dead_mean"] = train[level_columns(train, "dead_now")].mean(axis=1)
    valid = metrics[metrics.split == "valid"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for arm in arms:
        color, ls = arm_color(arm), "--" if arm == "upstream" else "-"
        a = train[train.arm == arm].groupby("step").mean(numeric_only=True)
        v = valid[valid.arm == arm].groupby("step").mean(numeric_only=True)
        axes[0].plot(a.index, a.used_l0, ls, color=color, label=arm)
        axes[1].plot(a.index, a.dead_mean, ls, color=color, label=arm)
        axes[2].plot(v.index, v.loss, ls, marker="o", color=color, label=arm)
    axes[0].set(title="codes used in the batch, level 0", xlabel="step", yscale="log")
    axes[1].set(title="dead codes per level (own threshold)", xlabel="step")
    axes[2].set(title="validation loss", xlabel="step")
    axes[0].legend(fontsize="x-small")
    fig.tight_layout()
    return fig


def plot_levels(frame: pd.DataFrame, prefix: str, title: str, ax=None, levels: int | None = 8, x: str = "step"):
    """`prefix_l{i}` per level over `x` (one line per level, darker = deeper)."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots()
    cols = level_columns(frame, prefix)[:levels]
    cmap = plt.get_cmap("viridis", max(len(cols), 2))
    for i, col in enumerate(cols):
        rows = frame.dropna(subset=[col])
        ax.plot(rows[x], rows[col], color=cmap(i), lw=1.2, label=f"level {col.rsplit('_l', 1)[1]}")
    ax.set(title=title, xlabel=x)
    ax.legend(ncol=2, fontsize="x-small")
    return ax


def opus_at_spent_bitrate(opus: pd.DataFrame, column: str = "kbps") -> pd.DataFrame:
    """Opus windows tagged arm "opus", placed at the mean payload bitrate of their requested one (`column`), so
    that a rate-distortion plot draws one point per request, not one per window (each window spends its own)."""
    spent = opus.groupby("bandwidth").payload_kbps.mean()
    return opus.assign(arm="opus", seed=0, **{column: opus.bandwidth.map(spent)})


def plot_rate_distortion(items: pd.DataFrame, metric: str, x: str = "nominal_kbps", hue: str = "arm", ax=None,
                         ci: str = "seed", xscale: str = "log"):
    """Mean `metric` against bitrate per `hue` (one line each); error bars = 95 % CI over `ci` (seeds, or
    items when `ci` has a single value). `xscale` "log" falls back to linear where a bitrate is 0 (an
    entropy bitrate of a collapsed codebook)."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots()
    for name, group in items.dropna(subset=[metric]).groupby(hue, sort=True):
        by = ci if group[ci].nunique() > 1 else "item"
        unit = group.groupby([x, by])[metric].mean().reset_index()
        stats = pd.DataFrame([(kbps, *t_ci95(g[metric].tolist())) for kbps, g in unit.groupby(x)],
                             columns=[x, "mean", "ci95"])
        ax.errorbar(stats[x], stats["mean"], yerr=stats["ci95"].fillna(0), marker="o", capsize=3, lw=1.5,
                    label=str(name), color=arm_color(name))
    ax.set(xlabel=x.replace("_", " "), ylabel=metric.replace("_", " "))
    values = items[x].dropna()
    if xscale == "log" and (values > 0).all():  # EnCodec's bandwidths double: a log axis spaces them evenly
        from matplotlib.ticker import FixedLocator, FormatStrFormatter, NullFormatter

        ax.set_xscale("log")
        ticks = [t for t in KBPS_TICKS if values.min() / 1.5 <= t <= values.max() * 1.5]
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.legend(fontsize="x-small")
    return ax


def plot_alternatives(table: pd.DataFrame, metrics: Sequence[tuple[str, str]]):
    """`findings.alternatives`' paired differences against bitrate: one panel per (metric, label), one line per
    alternative (its colour) and baseline (solid: fixed_rel, dashed: none), 95 % CI bars over paired seeds; the
    zero line is "no difference"."""
    import matplotlib.pyplot as plt

    cols = min(3, len(metrics))
    rows_n = -(-len(metrics) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.6 * cols, 3.4 * rows_n), squeeze=False)
    for ax in axes.flat[len(metrics):]:
        ax.set_visible(False)
    for ax, (metric, label) in zip(axes.flat, metrics):
        for (arm, baseline), rows in table.sort_values("bandwidth_kbps").groupby(["arm", "baseline"], sort=False):
            ax.errorbar(rows.bandwidth_kbps, rows[f"d_{metric}"], yerr=rows[f"d_{metric}_ci95"].fillna(0), marker="o",
                        capsize=3, color=arm_color(arm), ls="-" if baseline == "fixed_rel" else "--",
                        label=f"{arm} - {baseline}")
        ax.axhline(0, color="k", lw=0.8)
        ax.set(title=f"{label}: alternative - baseline", xlabel="nominal kbps", xscale="log")
        kbps = sorted(table.bandwidth_kbps.unique())
        ax.set_xticks(kbps, [f"{k:g}" for k in kbps])
        ax.minorticks_off()
    axes[0][0].legend(fontsize="x-small")
    fig.tight_layout()
    return fig


def audio_player(path: str | Path, seconds: float | None = 3.0):
    """An inline player for the first `seconds` of an audio file, embedded as 16-bit FLAC (about half the
    bytes of IPython's WAV, so reports stay small) and not normalised: level differences stay audible."""
    import base64
    import io

    import soundfile as sf
    from IPython.display import HTML

    audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
    audio = audio[: int(seconds * rate) if seconds else None, 0]
    buffer = io.BytesIO()
    sf.write(buffer, np.clip(audio, -1, 1), rate, format="FLAC", subtype="PCM_16")
    data = base64.b64encode(buffer.getvalue()).decode()
    return HTML(f'<audio controls preload="none" src="data:audio/flac;base64,{data}"></audio>')


def audio_table(rows: Sequence[dict], columns: Sequence[str], seconds: float | None = 3.0):
    """An HTML table of players: one row per example, one column per version; rows hold {column: path}."""
    from IPython.display import HTML

    head = "".join(f"<th>{html.escape(c)}</th>" for c in ("example", *columns))
    body = []
    for row in rows:
        cells = [f"<td>{html.escape(str(row.get('example', '')))}</td>"]
        for column in columns:
            path = row.get(column)
            cells.append(f"<td>{audio_player(path, seconds)._repr_html_() if path else '–'}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return HTML(f"<table><tr>{head}</tr>{''.join(body)}</table>")

