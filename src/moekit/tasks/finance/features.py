"""Causal per-instrument features and next-period volatility targets.

Every feature at date ``t`` is computed from returns dated ``<= t`` (pandas rolling windows
end at ``t``). Volatilities are put on a daily scale (monthly divided by sqrt(21)) so that
daily and monthly instruments share one feature space. Targets look forward and are kept
apart, with ``target_end`` recording the last date they depend on (used for purging).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from moekit.tasks.finance.data import Instrument
from moekit.tasks.finance.garch import (
    SCALE,
    GarchParams,
    filter_garch,
    fit_garch,
    forecast_mean_var,
)

#: Model inputs, in column order.
FEATURE_COLUMNS: tuple[str, ...] = (
    "ret",
    "log_rv_short",
    "log_rv_mid",
    "log_rv_long",
    "log_garch_vol",
    "drawdown",
    "skew",
    "kurt",
    "autocorr",
    "trend",
    "volume_z",
    "has_volume",
)


@dataclass(frozen=True)
class FeatureConfig:
    """Window lengths (in native periods) per frequency, forecast horizons and the vol floor."""

    daily_windows: tuple[int, int, int] = (5, 21, 63)
    monthly_windows: tuple[int, int, int] = (3, 6, 12)
    daily_moment_window: int = 63
    monthly_moment_window: int = 24
    daily_horizon: int = 5
    monthly_horizon: int = 1
    vol_floor: float = 1e-4  # daily-scale vol (decimal) floor before taking logs

    def __post_init__(self) -> None:
        for field in ("daily_windows", "monthly_windows"):
            w = getattr(self, field)
            if len(w) != 3 or any(x < 2 for x in w) or list(w) != sorted(w):
                raise ValueError(f"{field}: need three increasing windows >= 2, got {w}")
        for field in ("daily_moment_window", "monthly_moment_window"):
            if getattr(self, field) < 4:
                raise ValueError(f"{field}: must be >= 4")
        for field in ("daily_horizon", "monthly_horizon"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field}: must be >= 1")
        if not self.vol_floor > 0:
            raise ValueError("vol_floor: must be > 0")

    def windows(self, freq: str) -> tuple[tuple[int, int, int], int, int]:
        """(vol windows, moment window, horizon) for a frequency."""
        if freq == "D":
            return self.daily_windows, self.daily_moment_window, self.daily_horizon
        return self.monthly_windows, self.monthly_moment_window, self.monthly_horizon


def _log_vol(mean_sq: pd.Series, days: int, floor: float) -> pd.Series:
    return np.log(np.maximum(np.sqrt(mean_sq / days), floor))


def base_features(inst: Instrument, cfg: FeatureConfig) -> pd.DataFrame:
    """Features, targets and baselines for one instrument (rows = its dates).

    Columns: FEATURE_COLUMNS except ``log_garch_vol`` (fold-dependent, see
    :func:`add_garch`), ``rv_rule_pct`` (mid-window daily vol in percent, for the rule
    router), ``persist_logvol`` (log vol over the last horizon), targets ``target_logvol``,
    ``target_sign``, ``target_end``, plus ``instrument``, ``asset_class``, ``freq``, ``horizon``.
    Rows before the longest window is full are dropped.
    """
    (w_s, w_m, w_l), w_mom, h = cfg.windows(inst.freq)
    d = inst.days_per_period
    r = inst.returns.astype(float)
    r2 = r**2
    f = pd.DataFrame(index=r.index)
    f["ret"] = r / np.sqrt(d)
    for name, w in (("short", w_s), ("mid", w_m), ("long", w_l)):
        f[f"log_rv_{name}"] = _log_vol(r2.rolling(w).mean(), d, cfg.vol_floor)
    cum = r.cumsum()
    f["drawdown"] = cum - cum.cummax()
    roll = r.rolling(w_mom)
    f["skew"] = roll.skew()
    f["kurt"] = roll.kurt()
    f["autocorr"] = r.rolling(w_mom).corr(r.shift(1)).fillna(0.0)
    sd = roll.std().replace(0.0, np.nan)
    f["trend"] = (roll.mean() / (sd / np.sqrt(w_mom))).fillna(0.0)
    if inst.volume is not None:
        lv = np.log1p(inst.volume.astype(float))
        mu, sdv = lv.rolling(w_l, min_periods=w_s).mean(), lv.rolling(w_l, min_periods=w_s).std()
        f["volume_z"] = ((lv - mu) / sdv.replace(0.0, np.nan)).fillna(0.0).clip(-10, 10)
        f["has_volume"] = 1.0
    else:
        f["volume_z"] = 0.0
        f["has_volume"] = 0.0
    f["rv_rule_pct"] = 100.0 * np.exp(f["log_rv_mid"])
    f["persist_logvol"] = _log_vol(r2.rolling(h).mean(), d, cfg.vol_floor)
    # Targets: realised vol over the next h periods, sign of the next return.
    f["target_logvol"] = _log_vol(r2.rolling(h).mean().shift(-h), d, cfg.vol_floor)
    f["target_sign"] = (r.shift(-1) > 0).astype(float).where(r.shift(-1).notna())
    dates = pd.Series(r.index, index=r.index)
    f["target_end"] = dates.shift(-h)
    f = f.iloc[max(w_l, w_mom) :]
    f = f.dropna(subset=[c for c in FEATURE_COLUMNS if c != "log_garch_vol"])
    f.insert(0, "instrument", inst.name)
    f.insert(1, "asset_class", inst.asset_class)
    f.insert(2, "freq", inst.freq)
    f["horizon"] = h
    f.index.name = "date"
    return f


def build_panel(instruments: list[Instrument], cfg: FeatureConfig) -> pd.DataFrame:
    """Stack :func:`base_features` of all instruments into one long frame (``date`` column)."""
    names = [i.name for i in instruments]
    if len(set(names)) != len(names):
        raise ValueError(f"instruments: names must be unique, got {names}")
    parts = [base_features(i, cfg).reset_index() for i in instruments]
    return pd.concat(parts, ignore_index=True)


def add_garch(
    panel: pd.DataFrame, instruments: list[Instrument], train_end: pd.Timestamp, min_obs: int = 100
) -> tuple[pd.DataFrame, dict[str, GarchParams]]:
    """Fit GARCH per instrument on returns up to ``train_end`` and add, for every row,
    ``log_garch_vol`` (one-step conditional vol) and ``garch_logvol`` (GARCH forecast of the
    target), both on the daily scale. Instruments with too little training data get their
    persistence forecast instead and no entry in the returned params."""
    out = panel.copy()
    out["log_garch_vol"] = np.nan
    out["garch_logvol"] = np.nan
    params: dict[str, GarchParams] = {}
    for inst in instruments:
        rows = np.flatnonzero((out["instrument"] == inst.name).to_numpy())
        if len(rows) == 0:
            continue
        dates = pd.DatetimeIndex(out["date"].to_numpy()[rows])
        try:
            p = fit_garch(inst.returns, train_end, min_obs)
        except ValueError:
            fallback = out["persist_logvol"].to_numpy()[rows]
            out.iloc[rows, out.columns.get_loc("log_garch_vol")] = fallback
            out.iloc[rows, out.columns.get_loc("garch_logvol")] = fallback
            continue
        params[inst.name] = p
        var = filter_garch(inst.returns, p).reindex(dates).to_numpy()
        h = int(out["horizon"].to_numpy()[rows[0]])
        scale = SCALE**2 * inst.days_per_period
        out.iloc[rows, out.columns.get_loc("log_garch_vol")] = 0.5 * np.log(var / scale)
        fvar = forecast_mean_var(var, p, h)
        out.iloc[rows, out.columns.get_loc("garch_logvol")] = 0.5 * np.log(fvar / scale)
    return out, params


@dataclass(frozen=True)
class Standardizer:
    """Per-feature mean and std from training rows, applied unchanged to later rows."""

    mean: np.ndarray  # [F]
    std: np.ndarray  # [F]

    @classmethod
    def fit(cls, x: np.ndarray) -> Standardizer:
        """Statistics of the training matrix ``x`` [N, F]; constant columns get std 1."""
        std = x.std(axis=0)
        return cls(x.mean(axis=0), np.where(std > 1e-12, std, 1.0))

    def transform(self, x: np.ndarray) -> np.ndarray:
        """[N, F] -> standardised [N, F] float32."""
        return ((x - self.mean) / self.std).astype(np.float32)
