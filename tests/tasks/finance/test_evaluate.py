"""Metrics against hand-computed values; walk-forward splits never overlap or leak."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from moekit.tasks.finance.evaluate import (
    WalkForwardConfig,
    best_match_accuracy,
    metrics_by_class,
    mse_logvol,
    qlike,
    routing_agreement,
    walk_forward_splits,
)
from moekit.tasks.finance.features import FeatureConfig, build_panel


def test_qlike_hand_values() -> None:
    # true vol 2%, forecast 1%: s/h = 4 -> 4 - log 4 - 1
    true, pred = np.log([0.02, 0.01, 0.03]), np.log([0.01, 0.02, 0.03])
    np.testing.assert_allclose(
        qlike(true, pred), [3.0 - np.log(4.0), 0.25 - np.log(0.25) - 1.0, 0.0]
    )
    # under-prediction costs more than the same over-prediction
    assert qlike(true, pred)[0] > qlike(true, pred)[1]


def test_mse_logvol_hand_values() -> None:
    np.testing.assert_allclose(mse_logvol([1.0, -2.0, 0.5], [0.0, -1.0, 0.5]), [1.0, 1.0, 0.0])


def test_metrics_by_class_averages_per_class() -> None:
    pred = pd.DataFrame(
        {
            "asset_class": ["Equities", "Equities", "Credit"],
            "target_logvol": [0.0, 0.0, 1.0],
            **{f"pred_{m}": [0.0, 1.0, 1.0] for m in ("moe", "dense", "garch", "persist")},
        }
    )
    t = metrics_by_class(pred).set_index("asset_class")
    assert list(t.index) == ["Equities", "Credit", "All"]
    assert t.loc["Equities", "mse_moe"] == pytest.approx(0.5)
    assert t.loc["Credit", "mse_garch"] == pytest.approx(0.0)
    assert t.loc["All", "mse_dense"] == pytest.approx(1 / 3)
    assert t.loc["Equities", "qlike_persist"] == pytest.approx((np.exp(-2) + 2 - 1) / 2)
    assert t.loc["All", "n"] == 3


def test_best_match_accuracy() -> None:
    experts = np.array([2, 2, 0, 0, 5])
    classes = np.array([0, 0, 1, 1, 1])
    # best one-to-one map: 2->0, 0->1 (5 cannot also map to 1)
    assert best_match_accuracy(experts, classes, 6, 6) == pytest.approx(4 / 5)
    assert best_match_accuracy(classes, classes, 6, 6) == 1.0


def test_routing_agreement_keys_and_values() -> None:
    pred = pd.DataFrame(
        {
            "asset_class": ["Equities", "Credit", "Credit"],
            "expert": [3, 4, 4],
            "rule_class": [0, 5, 1],
        }
    )
    a = routing_agreement(pred)
    assert a["router_vs_class_best_map"] == 1.0
    assert a["rule_vs_class"] == pytest.approx(2 / 3)
    assert a["router_vs_rule_prior_map"] == 0.0
    assert a["router_vs_rule_best_map"] == pytest.approx(2 / 3)


def test_walk_forward_splits_never_overlap(small_universe) -> None:
    panel = build_panel(small_universe, FeatureConfig())
    splits = walk_forward_splits(panel, WalkForwardConfig(test_years=(2013, 2014, 2015)))
    dates = pd.DatetimeIndex(panel["date"])
    ends = pd.DatetimeIndex(panel["target_end"])
    seen_test: set[int] = set()
    for s in splits:
        assert len(np.intersect1d(s.train, s.test)) == 0
        assert dates[s.train].max() <= s.train_end < dates[s.test].min()
        # purged: no training target reaches into the test year
        assert ends[s.train].max() <= s.train_end
        assert (dates[s.test].year == s.test_year).all()
        assert seen_test.isdisjoint(s.test)
        seen_test.update(s.test.tolist())
    # expanding window: each fold trains on a superset of the previous one
    assert set(splits[0].train) < set(splits[1].train) < set(splits[2].train)
    # rows whose target crosses the cut are in neither set of that fold
    crossing = np.flatnonzero((dates <= splits[0].train_end) & (ends > splits[0].train_end))
    assert len(crossing) > 0
    assert not set(crossing) & set(splits[0].train)


def test_walk_forward_config_validation() -> None:
    with pytest.raises(ValueError, match="test_years"):
        WalkForwardConfig(test_years=(2015, 2014))
    with pytest.raises(ValueError, match="test_years"):
        WalkForwardConfig(test_years=())
