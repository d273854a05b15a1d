"""Rule router: vol bands and the documented overlap rules."""

from __future__ import annotations

import numpy as np
import pytest

from moekit.tasks.finance.data import ASSET_CLASSES
from moekit.tasks.finance.rules import RuleConfig, rule_route


def route(vol: float, drawdown: float = 0.0, trend: float = 0.0) -> str:
    out = rule_route(np.array([vol]), np.array([drawdown]), np.array([trend]))
    return ASSET_CLASSES[int(out[0])]


@pytest.mark.parametrize(
    ("vol", "expected"),
    [
        (0.1, "Fixed Income"),  # only FI
        (0.9, "FX"),  # only FX (0.8-1.0)
        (1.4, "Commodities"),  # only Commodities (1.3-1.5)
        (2.8, "Equities"),  # only Equities (2.5-3.0)
        (5.0, "Derivatives"),  # only Derivatives (>= 4)
    ],
)
def test_single_band(vol: float, expected: str) -> None:
    assert route(vol) == expected
    # market state cannot move a vol that sits in a single band
    assert route(vol, drawdown=-0.5, trend=5.0) == expected


@pytest.mark.parametrize(
    ("vol", "calm", "stressed"),
    [(0.3, "Fixed Income", "Credit"), (0.6, "FX", "Credit"), (3.5, "Derivatives", "Equities")],
)
def test_overlaps_resolved_by_stress(vol: float, calm: str, stressed: str) -> None:
    assert route(vol, drawdown=-0.05) == calm
    assert route(vol, drawdown=-0.2) == stressed


@pytest.mark.parametrize(
    ("vol", "flat", "trending"),
    [(1.1, "FX", "Commodities"), (2.0, "Equities", "Commodities")],
)
def test_overlaps_resolved_by_trend(vol: float, flat: str, trending: str) -> None:
    assert route(vol, trend=0.5) == flat
    assert route(vol, trend=-3.0) == trending


def test_band_edges() -> None:
    assert route(0.499) == "Fixed Income"  # FI/Credit overlap, calm -> Fixed Income
    assert route(0.5) == "FX"  # FI band is open at 0.5, Credit/FX overlap, calm -> FX
    assert route(0.19999) == "Fixed Income"
    assert route(4.0) == "Derivatives"
    assert route(2.999) == "Equities"


def test_vectorised_matches_scalar() -> None:
    rng = np.random.default_rng(0)
    vol, dd, tr = rng.uniform(0, 6, 200), -rng.uniform(0, 0.3, 200), rng.normal(0, 2, 200)
    out = rule_route(vol, dd, tr)
    assert out.shape == (200,) and out.dtype == np.int64
    assert [ASSET_CLASSES[o] for o in out] == [
        route(v, d, t) for v, d, t in zip(vol, dd, tr, strict=True)
    ]


def test_custom_gap_goes_to_nearest_band() -> None:
    cfg = RuleConfig(credit=(0.2, 0.3), fx=(0.6, 1.3))
    out = rule_route(np.array([0.45]), np.array([0.0]), np.array([0.0]), cfg)
    assert ASSET_CLASSES[int(out[0])] == "Fixed Income"  # FI still covers < 0.5
    out = rule_route(np.array([0.58]), np.array([0.0]), np.array([0.0]), cfg)
    assert ASSET_CLASSES[int(out[0])] == "FX"  # in no band; 0.02 below FX, 0.08 above FI


def test_config_validation_names_field() -> None:
    with pytest.raises(ValueError, match="credit"):
        RuleConfig(credit=(0.8, 0.2))
    with pytest.raises(ValueError, match="stress_drawdown"):
        RuleConfig(stress_drawdown=0.0)
