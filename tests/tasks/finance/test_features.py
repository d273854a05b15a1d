"""Features use only data up to each date; GARCH sees only the training period."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from moekit.tasks.finance.features import (
    FEATURE_COLUMNS,
    FeatureConfig,
    Standardizer,
    add_garch,
    base_features,
    build_panel,
)

CUT = pd.Timestamp("2014-06-30")


def test_features_at_earlier_dates_ignore_future(small_universe, perturb_after) -> None:
    cfg = FeatureConfig()
    train_end = pd.Timestamp("2013-12-31")
    changed = [perturb_after(i, CUT) for i in small_universe]
    p0, _ = add_garch(build_panel(small_universe, cfg), small_universe, train_end)
    p1, _ = add_garch(build_panel(changed, cfg), changed, train_end)
    cols = [*FEATURE_COLUMNS, "rv_rule_pct", "persist_logvol", "garch_logvol"]
    early = (p0["date"] <= CUT).to_numpy()
    assert early.sum() > 1000
    np.testing.assert_array_equal(p0.loc[early, cols].to_numpy(), p1.loc[early, cols].to_numpy())
    # the perturbation is real: later features do change
    assert not np.allclose(p0.loc[~early, cols].to_numpy(), p1.loc[~early, cols].to_numpy())


def test_targets_look_forward_and_record_their_end(small_universe) -> None:
    inst = small_universe[0]
    cfg = FeatureConfig(daily_horizon=5)
    f = base_features(inst, cfg)
    r = inst.returns
    t = f.index[10]
    pos = r.index.get_loc(t)
    expect = 0.5 * np.log(np.mean(r.iloc[pos + 1 : pos + 6] ** 2))
    assert np.isclose(f.loc[t, "target_logvol"], expect)
    assert f.loc[t, "target_end"] == r.index[pos + 5]
    assert f.loc[t, "target_sign"] == float(r.iloc[pos + 1] > 0)
    # the last rows have no complete target
    assert f["target_logvol"].iloc[-5:].isna().all()
    assert f["target_logvol"].iloc[:-5].notna().all()


def test_realised_vol_feature_hand_value(small_universe) -> None:
    inst = small_universe[1]
    f = base_features(inst, FeatureConfig())
    t = f.index[0]
    pos = inst.returns.index.get_loc(t)
    window = inst.returns.iloc[pos - 20 : pos + 1]
    assert np.isclose(f.loc[t, "log_rv_mid"], 0.5 * np.log(np.mean(window**2)))
    assert f["drawdown"].max() <= 0


def test_monthly_vol_on_daily_scale(small_universe) -> None:
    fi = small_universe[3]
    f = base_features(fi, FeatureConfig())
    # synthetic monthly series has unconditional daily-scale vol 0.3%
    assert 0.1 < float(np.exp(f["log_rv_long"]).median()) * 100 < 0.6


def test_standardizer_uses_training_rows_only() -> None:
    x = np.array([[1.0, 5.0], [3.0, 5.0], [100.0, 7.0]])
    s = Standardizer.fit(x[:2])
    np.testing.assert_allclose(s.mean, [2.0, 5.0])
    np.testing.assert_allclose(s.std, [1.0, 1.0])  # constant column -> std 1
    np.testing.assert_allclose(s.transform(x)[2], [98.0, 2.0])


def test_feature_config_validation_names_field() -> None:
    with pytest.raises(ValueError, match="daily_windows"):
        FeatureConfig(daily_windows=(21, 5, 63))
    with pytest.raises(ValueError, match="monthly_horizon"):
        FeatureConfig(monthly_horizon=0)


def test_build_panel_rejects_duplicate_names(small_universe) -> None:
    with pytest.raises(ValueError, match="instruments"):
        build_panel([small_universe[0], small_universe[0]], FeatureConfig())
