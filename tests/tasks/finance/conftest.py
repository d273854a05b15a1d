"""Synthetic instruments for fast, deterministic finance tests."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from moekit.tasks.finance.data import Instrument


def garch_returns(n: int, daily_vol: float, seed: int) -> np.ndarray:
    """Returns from a GARCH(1,1) with unconditional vol ``daily_vol`` (decimal)."""
    rng = np.random.default_rng(seed)
    alpha, beta = 0.08, 0.9
    omega = daily_vol**2 * (1 - alpha - beta)
    s2, out = daily_vol**2, np.empty(n)
    for t in range(n):
        out[t] = np.sqrt(s2) * rng.standard_normal()
        s2 = omega + alpha * out[t] ** 2 + beta * s2
    return out


def make_instrument(
    name: str,
    asset_class: str,
    daily_vol: float,
    seed: int,
    start: str = "2011-01-03",
    end: str = "2015-12-31",
    freq: str = "D",
    volume: bool = False,
) -> Instrument:
    """A synthetic instrument on business days (or month ends for ``freq='M'``)."""
    dates = pd.bdate_range(start, end) if freq == "D" else pd.date_range(start, end, freq="ME")
    scale = 1.0 if freq == "D" else np.sqrt(21.0)
    r = pd.Series(garch_returns(len(dates), daily_vol * scale, seed), index=dates)
    vol = None
    if volume:
        rng = np.random.default_rng(seed + 100)
        vol = pd.Series(rng.lognormal(15, 0.3, len(dates)), index=dates)
    return Instrument(name, asset_class, freq, r, vol, "synthetic")


@pytest.fixture
def garch_sim():
    """The GARCH(1,1) return simulator, for tests that need raw returns."""
    return garch_returns


def _perturb_after(inst: Instrument, cut: pd.Timestamp, seed: int = 9) -> Instrument:
    """Same instrument with every return (and volume) after ``cut`` replaced."""
    rng = np.random.default_rng(seed)
    r = inst.returns.copy()
    later = r.index > cut
    r[later] = rng.standard_normal(int(later.sum())) * 0.2
    vol = None
    if inst.volume is not None:
        vol = inst.volume.copy()
        vol[later] = vol[later] * 50
    return Instrument(inst.name, inst.asset_class, inst.freq, r, vol, inst.source)


@pytest.fixture
def perturb_after():
    """``perturb_after(instrument, cut)``: replace all data after ``cut`` (look-ahead probe)."""
    return _perturb_after


@pytest.fixture
def small_universe() -> list[Instrument]:
    """Four synthetic instruments with class-typical vol levels, 2011-2015."""
    return [
        make_instrument("EQ", "Equities", 0.012, 1, volume=True),
        make_instrument("CO", "Commodities", 0.022, 2),
        make_instrument("DE", "Derivatives", 0.07, 3),
        make_instrument("FI", "Fixed Income", 0.003, 4, start="2000-01-31", freq="M"),
    ]
