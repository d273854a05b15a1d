"""Tiny end-to-end runs: models, prior, predictions without look-ahead, demo outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from moekit.tasks.finance.evaluate import WalkForwardConfig, run_walk_forward
from moekit.tasks.finance.features import FEATURE_COLUMNS, FeatureConfig, build_panel
from moekit.tasks.finance.model import (
    ForecastConfig,
    build_models,
    forecast_moe,
    predict,
    train_forecaster,
)
from moekit.tasks.finance.pipeline import DemoConfig, run_pipeline
from moekit.viz.finance import make_all

TINY = ForecastConfig(moe=forecast_moe(d_model=16, d_hidden=16), epochs=2, batch_size=256)
WF = WalkForwardConfig(test_years=(2014,))
CUT = pd.Timestamp("2014-06-30")


def test_dense_matches_moe_active_parameters() -> None:
    moe, dense = build_models(len(FEATURE_COLUMNS), TINY)
    a, b = moe.active_parameters(), dense.active_parameters()
    assert abs(a - b) <= 3 * TINY.moe.d_model  # equal to within one hidden unit
    total = sum(p.numel() for p in moe.parameters())
    assert a < total  # the MoE holds more parameters than it uses per row


def test_forecast_config_validation_and_prior_decay() -> None:
    with pytest.raises(ValueError, match="vol_loss"):
        ForecastConfig(vol_loss="mae")
    with pytest.raises(ValueError, match="k=7"):
        forecast_moe(k=7)
    with pytest.raises(ValueError, match="moe"):
        ForecastConfig(moe=3)
    assert ForecastConfig(moe={"d_model": 8, "d_hidden": 4}).moe.d_model == 8
    assert forecast_moe(k=1).router.renormalize is False  # k=1 keeps the router trainable
    cfg = ForecastConfig(prior_weight=2.0, prior_half_life=3.0)
    assert cfg.prior_weight_at(0) == 2.0
    assert cfg.prior_weight_at(3) == pytest.approx(1.0)


def test_rule_prior_pulls_router_to_rule_classes() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((600, 5)).astype(np.float32)
    prior = (x[:, 0] > 0).astype(np.int64) * 4  # two prior classes: experts 0 and 4
    y = np.zeros(600, np.float32)
    cfg = ForecastConfig(moe=forecast_moe(d_model=16, d_hidden=16), epochs=15, batch_size=100,
                         prior_weight=5.0, prior_half_life=100.0, lr=1e-2)  # fmt: skip
    moe, _ = build_models(5, cfg)
    train_forecaster(moe, x, y, y, prior)
    out = predict(moe, x)
    assert np.mean(out["expert"] == prior) > 0.9
    assert out["probs"].shape == (600, 6)


def test_predictions_ignore_future_data(small_universe, perturb_after) -> None:
    cfg = FeatureConfig()
    changed = [perturb_after(i, CUT) for i in small_universe]
    a = run_walk_forward(small_universe, build_panel(small_universe, cfg), WF, TINY).predictions
    b = run_walk_forward(changed, build_panel(changed, cfg), WF, TINY).predictions
    assert len(a) == len(b)
    early = (a["date"] <= CUT).to_numpy()
    assert early.sum() > 300
    cols = ["pred_moe", "pred_dense", "pred_garch", "pred_persist", "sign_prob_moe", "expert"]
    np.testing.assert_allclose(
        a.loc[early, cols].to_numpy(float), b.loc[early, cols].to_numpy(float)
    )
    assert not np.allclose(a.loc[~early, "pred_moe"], b.loc[~early, "pred_moe"])


def test_tiny_end_to_end(small_universe, tmp_path: Path) -> None:
    cfg = DemoConfig(walk_forward=WalkForwardConfig(test_years=(2014, 2015)), model=TINY)
    console = Console(record=True, width=120)
    res = run_pipeline(small_universe, cfg, tmp_path, console, draw=make_all)
    text = console.export_text()
    assert "QLIKE" in text and "GARCH(1,1)" in text and "routing_heatmap" in text
    table = pd.DataFrame(res["table"]).set_index("asset_class")
    assert list(table.index) == ["Equities", "Fixed Income", "Commodities", "Derivatives", "All"]
    assert np.isfinite(table.to_numpy(float)).all()
    pred = res["predictions"]
    assert set(pred["fold"]) == {2014, 2015}
    assert pred["expert"].between(0, 5).all()
    for key in ("router_vs_class_best_map", "rule_vs_class"):
        assert 0.0 <= res["agreement"][key] <= 1.0
    for path in res["plots"].values():
        assert Path(path).stat().st_size > 5000
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["table"][0]["asset_class"] == "Equities"
    assert len(saved["folds"]) == 2
