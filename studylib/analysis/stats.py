"""Statistics over seeds, in one place: the 95 % Student-t interval (`t_ci95`), mean ± CI over seeds
(`seed_summary`) and the paired-by-seed difference (`paired`) every comparison of two arms reports.

Paired by seed: two arms trained with the same seed start from the same weights and see the same batches, so
their difference per seed removes what the seed alone does; the interval is taken over those differences.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats


def t_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of the two-sided 95 % Student-t interval (NaN half-width for n < 2); None and
    non-finite values are left out."""
    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if x.size == 0:
        return math.nan, math.nan
    if x.size < 2:
        return float(x.mean()), math.nan
    return float(x.mean()), float(stats.t.ppf(0.975, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))


def seed_summary(frame: pd.DataFrame, by: Sequence[str], values: Sequence[str], seed: str = "seed") -> pd.DataFrame:
    """Mean and 95 % CI over seeds: per-seed means first (items, levels ... pooled), then a t-interval
    across seeds. Columns: *by, metric, mean, ci95 (half-width, NaN with one seed), n_seeds."""
    per_seed = frame.groupby([*by, seed], dropna=False)[list(values)].mean().reset_index()
    rows = []
    for key, group in per_seed.groupby(list(by), dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        for metric in values:
            mean, half = t_ci95(group[metric].tolist())
            rows.append({**dict(zip(by, key)), "metric": metric, "mean": mean, "ci95": half,
                         "n_seeds": int(group[metric].notna().sum())})
    return pd.DataFrame(rows, columns=[*by, "metric", "mean", "ci95", "n_seeds"])  # an empty table keeps its header


@dataclass(frozen=True)
class Paired:
    """`arm` minus `baseline` over the keys (seeds) both have: mean, 95 % half-width (NaN for one key), count."""

    diff: float
    ci95: float
    n: int


def paired(arm: pd.DataFrame, baseline: pd.DataFrame, column: str, keys: Sequence[Hashable] | None = None,
           ratio: bool = False) -> Paired:
    """The paired difference (or, `ratio`, the paired ratio arm / baseline) of `column` between two frames indexed
    by seed (or any key), over `keys` (default: every key both have)."""
    keys = sorted(set(arm.index) & set(baseline.index)) if keys is None else list(keys)
    values = [arm.loc[k, column] / baseline.loc[k, column] if ratio else arm.loc[k, column] - baseline.loc[k, column]
              for k in keys]
    mean, half = t_ci95(values)
    return Paired(mean, half, len(keys))
