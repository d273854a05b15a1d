"""Statistics of forecast comparisons: confidence intervals over seeds, Diebold-Mariano tests.

The Diebold-Mariano test (Diebold and Mariano 1995) asks whether two forecasts' expected
losses differ, from the loss differential d_t = L(a)_t - L(b)_t. The mean's variance sums
the autocovariances up to lag h - 1 (h-step forecasts of overlapping targets are
correlated that far), with the small-sample correction and Student-t reference of Harvey,
Leybourne and Newbold (1997).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats


@dataclass(frozen=True)
class MeanCI:
    """Mean of values over seeds and its two-sided confidence interval (t distribution)."""

    mean: float
    low: float
    high: float
    n: int


def mean_ci(values: np.ndarray | list[float], level: float = 0.95) -> MeanCI:
    """Mean and `level` confidence interval of the mean; one value gives an interval of NaN."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("values: need at least one value")
    if not 0 < level < 1:
        raise ValueError(f"level={level} must be in (0, 1)")
    mean = float(x.mean())
    if x.size == 1:
        return MeanCI(mean, math.nan, math.nan, 1)
    half = stats.t.ppf(0.5 + level / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
    return MeanCI(mean, mean - half, mean + half, int(x.size))


@dataclass(frozen=True)
class DMResult:
    """stat < 0: the first forecast has the lower loss; p: two-sided p-value."""

    stat: float
    p_value: float
    mean_diff: float
    n: int
    horizon: int


def diebold_mariano(diff: np.ndarray, horizon: int = 1) -> DMResult:
    """DM test of mean(diff) = 0 for a loss differential series diff [N] of h-step forecasts."""
    d = np.asarray(diff, dtype=float)
    d = d[np.isfinite(d)]
    n, h = d.size, int(horizon)
    if h < 1:
        raise ValueError(f"horizon={horizon} must be >= 1")
    if n < max(3, 2 * h):
        raise ValueError(f"diff: {n} values are too few for a horizon-{h} test")
    centred = d - d.mean()
    autocov = [centred[k:] @ centred[: n - k] / n for k in range(h)]  # gamma_0 .. gamma_{h-1}
    var = (autocov[0] + 2 * sum(autocov[1:])) / n
    if not var > 0:  # identical forecasts, or a window that made the variance vanish
        return DMResult(math.nan, math.nan, float(d.mean()), n, h)
    correction = math.sqrt((n + 1 - 2 * h + h * (h - 1) / n) / n)
    stat = float(d.mean() / math.sqrt(var) * correction)
    return DMResult(stat, float(2 * stats.t.sf(abs(stat), n - 1)), float(d.mean()), n, h)


def dm_by_group(
    frame: pd.DataFrame, diff: str, horizon: dict[str, int], groups: list[tuple[str, pd.Series]]
) -> list[dict]:
    """DM test per group of rows (a boolean mask each); rows sharing a date are averaged first.

    frame holds `date`, `freq` and the differential column `diff`; the horizon of a group is
    the longest of its frequencies' (`horizon` maps freq -> periods).
    """
    out = []
    for name, mask in groups:
        rows = frame[mask.to_numpy()]
        if rows.empty:
            continue
        series = rows.groupby("date")[diff].mean().sort_index()
        h = max(horizon[f] for f in rows["freq"].unique())
        try:
            res = diebold_mariano(series.to_numpy(), h)
        except ValueError:  # too short a series for this horizon
            continue
        out.append({"group": name, **res.__dict__})
    return out
