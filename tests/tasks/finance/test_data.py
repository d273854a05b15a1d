"""Offline arch data: asset-class tags, month-end stamping, honest gaps (no FX)."""

from __future__ import annotations

import importlib

import numpy as np
import pandas as pd
import pytest

from moekit.tasks.finance import data
from moekit.tasks.finance.data import Instrument, bond_returns_from_yields, load_arch_instruments


def test_arch_instruments_tags_and_frequencies() -> None:
    inst = {i.name: i for i in load_arch_instruments()}
    assert {n: i.asset_class for n, i in inst.items()} == {
        "SP500": "Equities",
        "NASDAQ": "Equities",
        "WTI": "Commodities",
        "VIX": "Derivatives",
        "MKT-RF": "Equities",
        "BRENT": "Commodities",
        "AAA": "Fixed Income",
        "BAA-AAA": "Credit",
    }
    assert not any(i.asset_class == "FX" for i in inst.values())
    assert inst["SP500"].freq == "D" and inst["SP500"].volume is not None
    assert inst["AAA"].freq == "M"
    # monthly rows are stamped at month end, when the observation is known
    assert inst["AAA"].returns.index.is_month_end.all()
    assert inst["MKT-RF"].returns.index[0] == pd.Timestamp("1926-08-31")
    # daily-scale vol ordering that the rule router relies on
    vols = {n: i.returns.std() / np.sqrt(i.days_per_period) for n, i in inst.items()}
    assert vols["VIX"] > vols["WTI"] > vols["SP500"] > vols["AAA"]


def test_bond_returns_from_yields_hand_value() -> None:
    y = pd.Series([5.0, 5.5], index=pd.date_range("2000-01-31", periods=2, freq="ME"))
    r = bond_returns_from_yields(y, duration=10.0)
    # carry 5%/12 minus 10 * 0.5% price loss
    assert np.isclose(r.iloc[0], np.log1p(0.05 / 12 - 10 * 0.005))
    assert len(r) == 1


def test_instrument_validation_names_field() -> None:
    r = pd.Series([0.1, 0.2], index=pd.date_range("2020-01-01", periods=2))
    with pytest.raises(ValueError, match="asset_class"):
        Instrument("x", "Crypto", "D", r)
    with pytest.raises(ValueError, match="freq"):
        Instrument("x", "Equities", "W", r)
    with pytest.raises(ValueError, match="returns"):
        Instrument("x", "Equities", "D", r.iloc[::-1])


def test_tickers_without_yfinance_points_to_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.import_module

    def fake(name: str, *a, **k):
        if name == "yfinance":
            raise ImportError("no yfinance")
        return real(name, *a, **k)

    monkeypatch.setattr(data.importlib, "import_module", fake)
    with pytest.raises(RuntimeError, match="load_arch_instruments"):
        data.load_tickers({"SPY": "Equities"})
