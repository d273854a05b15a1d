"""Threshold rule router: asset class from daily volatility, overlaps settled by market state.

Daily volatility bands (percent per day, from the mid-window realised vol):

=============  ===============
Fixed Income   below 0.5
Credit         0.2 to 0.8
FX             0.5 to 1.3
Commodities    1.0 to 2.5
Equities       1.5 to 4.0
Derivatives    above 3.0
=============  ===============

A vol inside exactly one band gets that class. Where two bands overlap:

* Fixed Income / Credit (0.2-0.5) and Credit / FX (0.5-0.8): Credit when the series is
  in *stress* (drawdown deeper than ``stress_drawdown``): spreads widen in sell-offs;
  otherwise the calmer class (Fixed Income, FX).
* FX / Commodities (1.0-1.3) and Commodities / Equities (1.5-2.5): Commodities when the
  series is *trending* (|t-stat of the mean return| above ``trend_t``): commodity prices move
  in long supply-driven trends; otherwise FX or Equities.
* Equities / Derivatives (3.0-4.0): Equities in stress (a crash in a cash market), else
  Derivatives (high vol without a drawdown is typical of volatility products).

These are heuristics, not facts about markets: they are a transparent baseline and a prior.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moekit.tasks.finance.data import ASSET_CLASSES

EQ, FI, CO, FX, DE, CR = (ASSET_CLASSES.index(c) for c in ASSET_CLASSES)


@dataclass(frozen=True)
class RuleConfig:
    """Band edges (daily vol, percent) and the market-state thresholds used in overlaps."""

    fixed_income_max: float = 0.5
    credit: tuple[float, float] = (0.2, 0.8)
    fx: tuple[float, float] = (0.5, 1.3)
    commodities: tuple[float, float] = (1.0, 2.5)
    equities: tuple[float, float] = (1.5, 4.0)
    derivatives_min: float = 3.0
    stress_drawdown: float = 0.10  # log drawdown, positive number
    trend_t: float = 2.0

    def __post_init__(self) -> None:
        for field in ("credit", "fx", "commodities", "equities"):
            lo, hi = getattr(self, field)
            if not 0 <= lo < hi:
                raise ValueError(f"{field}: need 0 <= low < high, got {(lo, hi)}")
        if self.fixed_income_max <= 0 or self.derivatives_min <= 0:
            raise ValueError("fixed_income_max/derivatives_min: must be > 0")
        if self.stress_drawdown <= 0:
            raise ValueError("stress_drawdown: must be > 0")
        if self.trend_t <= 0:
            raise ValueError("trend_t: must be > 0")

    def bands(self) -> np.ndarray:
        """[6, 2] (low, high) per class in ASSET_CLASSES order."""
        b = np.zeros((len(ASSET_CLASSES), 2))
        b[FI] = (0.0, self.fixed_income_max)
        b[CR] = self.credit
        b[FX] = self.fx
        b[CO] = self.commodities
        b[EQ] = self.equities
        b[DE] = (self.derivatives_min, np.inf)
        return b


def rule_route(
    vol_pct: np.ndarray, drawdown: np.ndarray, trend: np.ndarray, cfg: RuleConfig | None = None
) -> np.ndarray:
    """Class index (into ASSET_CLASSES) per row. Inputs are [N] arrays: daily vol in percent,
    log drawdown (<= 0) and the trend t-statistic. Vol falling between bands goes to the
    nearest band."""
    cfg = cfg or RuleConfig()
    vol = np.asarray(vol_pct, dtype=float)
    stress = np.asarray(drawdown, dtype=float) <= -cfg.stress_drawdown
    trending = np.abs(np.asarray(trend, dtype=float)) >= cfg.trend_t
    b = cfg.bands()
    inside = (vol[:, None] >= b[None, :, 0]) & (vol[:, None] < b[None, :, 1])  # [N, 6]
    # Nearest band for vols that fall in no band (only possible with custom edges).
    dist = np.maximum(b[None, :, 0] - vol[:, None], vol[:, None] - b[None, :, 1])
    out = np.where(inside.any(1), -1, dist.argmin(1))
    single = inside.sum(1) == 1
    out = np.where(single, inside.argmax(1), out)
    pair_rules = (
        ((FI, CR), np.where(stress, CR, FI)),
        ((CR, FX), np.where(stress, CR, FX)),
        ((FX, CO), np.where(trending, CO, FX)),
        ((CO, EQ), np.where(trending, CO, EQ)),
        ((EQ, DE), np.where(stress, EQ, DE)),
    )
    for (a, c), choice in pair_rules:
        both = inside[:, a] & inside[:, c] & (inside.sum(1) == 2)
        out = np.where(both, choice, out)
    # More than two bands can only overlap with custom edges: take the lowest-vol band.
    rest = out < 0
    out = np.where(rest, np.argmax(np.where(inside, -b[None, :, 0], -np.inf), 1), out)
    return out.astype(np.int64)
