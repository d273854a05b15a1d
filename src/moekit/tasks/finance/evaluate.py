"""Walk-forward evaluation: train up to year Y, test on Y+1, for each test year in turn.

Per fold, everything fitted (GARCH parameters, feature standardisation, both networks) sees
only rows whose features *and* targets end on or before 31 December of year Y; test rows are
dated in Y+1. Metrics: QLIKE on variances and MSE on log-vol, per asset class.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment

from moekit.tasks.finance.data import ASSET_CLASSES, Instrument
from moekit.tasks.finance.features import FEATURE_COLUMNS, Standardizer, add_garch
from moekit.tasks.finance.model import ForecastConfig, build_models, predict, train_forecaster
from moekit.tasks.finance.rules import RuleConfig, rule_route

METHODS: tuple[str, ...] = ("moe", "dense", "garch", "persist")


@dataclass(frozen=True)
class WalkForwardConfig:
    """Test years (each trained on all earlier years) and the minimum training set size."""

    test_years: tuple[int, ...] = (2016, 2017, 2018)
    min_train_rows: int = 200

    def __post_init__(self) -> None:
        years = list(self.test_years)
        if not years or years != sorted(set(years)):
            raise ValueError(f"test_years: need strictly increasing years, got {self.test_years}")
        if self.min_train_rows < 1:
            raise ValueError("min_train_rows: must be >= 1")


@dataclass
class Split:
    """Row positions (into the panel) of one fold."""

    test_year: int
    train_end: pd.Timestamp
    train: np.ndarray
    test: np.ndarray


@dataclass
class WalkForwardResult:
    """Out-of-sample predictions (one row per test row) plus per-fold diagnostics."""

    predictions: pd.DataFrame
    folds: list[dict] = field(default_factory=list)


def walk_forward_splits(panel: pd.DataFrame, cfg: WalkForwardConfig) -> list[Split]:
    """Train rows: dated and with targets ending on or before 31 Dec of the year before the
    test year (no target leaks across the cut); test rows: dated in the test year."""
    dates = pd.DatetimeIndex(panel["date"])
    target_end = pd.DatetimeIndex(panel["target_end"])
    has_target = panel["target_logvol"].notna().to_numpy()
    splits = []
    for year in cfg.test_years:
        end = pd.Timestamp(year=year - 1, month=12, day=31)
        train = np.flatnonzero(has_target & (dates <= end) & (target_end <= end))
        test = np.flatnonzero(has_target & (dates.year == year))
        if len(train) < cfg.min_train_rows or len(test) == 0:
            raise ValueError(
                f"test_years: fold {year} has {len(train)} training and {len(test)} test rows"
            )
        splits.append(Split(year, end, train, test))
    return splits


def qlike(true_logvol: np.ndarray, pred_logvol: np.ndarray) -> np.ndarray:
    """Per-row QLIKE of variance forecasts: s/h - log(s/h) - 1, with s = true variance and
    h = forecast variance (0 for a perfect forecast; robust to noise in the proxy s)."""
    d = 2.0 * (np.asarray(true_logvol, dtype=float) - np.asarray(pred_logvol, dtype=float))
    return np.exp(d) - d - 1.0


def mse_logvol(true_logvol: np.ndarray, pred_logvol: np.ndarray) -> np.ndarray:
    """Per-row squared error of log-volatility."""
    return (np.asarray(true_logvol, dtype=float) - np.asarray(pred_logvol, dtype=float)) ** 2


def run_walk_forward(
    instruments: list[Instrument],
    panel: pd.DataFrame,
    wf: WalkForwardConfig,
    model_cfg: ForecastConfig,
    rule_cfg: RuleConfig | None = None,
    after_fold: Callable[[int], None] | None = None,
) -> WalkForwardResult:
    """Fit and predict every fold; returns out-of-sample predictions of all four methods.

    `after_fold(test_year)` is called as each fold finishes (a progress bar's hook)."""
    rule_cfg = rule_cfg or RuleConfig()
    rule_all = rule_route(
        panel["rv_rule_pct"].to_numpy(),
        panel["drawdown"].to_numpy(),
        panel["trend"].to_numpy(),
        rule_cfg,
    )  # [N]
    cols = list(FEATURE_COLUMNS)
    frames, folds = [], []
    for split in walk_forward_splits(panel, wf):
        fold_panel, params = add_garch(panel, instruments, split.train_end)
        x = fold_panel[cols].to_numpy(dtype=float)  # [N, F]
        scaler = Standardizer.fit(x[split.train])
        x_tr, x_te = scaler.transform(x[split.train]), scaler.transform(x[split.test])
        y = fold_panel["target_logvol"].to_numpy(dtype=float)
        y_mu, y_sd = float(y[split.train].mean()), float(y[split.train].std())
        y_tr = ((y[split.train] - y_mu) / y_sd).astype(np.float32)
        s_tr = fold_panel["target_sign"].to_numpy(dtype=float)[split.train].astype(np.float32)

        moe, dense = build_models(len(cols), model_cfg)
        hist_moe = train_forecaster(moe, x_tr, y_tr, s_tr, rule_all[split.train], y_sd)
        hist_dense = train_forecaster(dense, x_tr, y_tr, s_tr, None, y_sd)
        p_moe, p_dense = predict(moe, x_te), predict(dense, x_te)

        test = fold_panel.iloc[split.test]
        out = test[
            ["date", "instrument", "asset_class", "freq", "target_logvol", "target_sign"]
            + ["ret", "rv_rule_pct", "drawdown"]
        ].copy()
        out["fold"] = split.test_year
        out["pred_moe"] = p_moe["logvol"] * y_sd + y_mu
        out["pred_dense"] = p_dense["logvol"] * y_sd + y_mu
        out["pred_garch"] = test["garch_logvol"].to_numpy()
        out["pred_persist"] = test["persist_logvol"].to_numpy()
        out["sign_prob_moe"] = p_moe["sign_prob"]
        out["sign_prob_dense"] = p_dense["sign_prob"]
        out["expert"] = p_moe["expert"]
        out["expert_weight"] = p_moe["expert_weight"]
        out["router_maxprob"] = p_moe["probs"].max(axis=1)
        out["rule_class"] = rule_all[split.test]
        frames.append(out)
        folds.append(
            {
                "test_year": split.test_year,
                "train_end": str(split.train_end.date()),
                "n_train": len(split.train),
                "n_test": len(split.test),
                "garch": {k: {"alpha": v.alpha, "beta": v.beta} for k, v in params.items()},
                "loss_moe": hist_moe,
                "loss_dense": hist_dense,
                "active_params_moe": moe.active_parameters(),
                "active_params_dense": dense.active_parameters(),
            }
        )
        if after_fold is not None:
            after_fold(split.test_year)
    return WalkForwardResult(pd.concat(frames, ignore_index=True), folds)


def metrics_by_class(pred: pd.DataFrame) -> pd.DataFrame:
    """Mean QLIKE and log-vol MSE per method, per asset class present, plus ``All``."""
    rows = []
    groups = [(c, pred[pred["asset_class"] == c]) for c in ASSET_CLASSES]
    for name, g in [*groups, ("All", pred)]:
        if len(g) == 0:
            continue
        row: dict = {"asset_class": name, "n": len(g)}
        for m in METHODS:
            row[f"qlike_{m}"] = float(qlike(g["target_logvol"], g[f"pred_{m}"]).mean())
            row[f"mse_{m}"] = float(mse_logvol(g["target_logvol"], g[f"pred_{m}"]).mean())
        rows.append(row)
    return pd.DataFrame(rows)


def metrics_by_instrument(pred: pd.DataFrame) -> pd.DataFrame:
    """Per-instrument QLIKE of each method plus the MoE's routing profile."""
    rows = []
    for name, g in pred.groupby("instrument", sort=False):
        share = np.bincount(g["expert"], minlength=len(ASSET_CLASSES)) / len(g)
        row = {"instrument": name, "asset_class": g["asset_class"].iloc[0], "n": len(g)}
        for m in METHODS:
            row[f"qlike_{m}"] = float(qlike(g["target_logvol"], g[f"pred_{m}"]).mean())
        row["top_expert"] = int(share.argmax())
        row["top_expert_share"] = float(share.max())
        rows.append(row)
    return pd.DataFrame(rows)


def best_match_accuracy(a: np.ndarray, b: np.ndarray, n_a: int, n_b: int) -> float:
    """Share of rows where labels agree under the best one-to-one map from a-labels to
    b-labels (Hungarian algorithm on the confusion matrix)."""
    conf = np.zeros((n_a, n_b))
    np.add.at(conf, (np.asarray(a), np.asarray(b)), 1.0)
    r, c = linear_sum_assignment(-conf)
    return float(conf[r, c].sum() / max(len(a), 1))


def routing_agreement(pred: pd.DataFrame) -> dict[str, float]:
    """Agreement of the learned router (top-1 expert) and the rule router with the true
    asset classes and with each other."""
    n = len(ASSET_CLASSES)
    true = pred["asset_class"].map(ASSET_CLASSES.index).to_numpy()
    expert, rule = pred["expert"].to_numpy(), pred["rule_class"].to_numpy()
    return {
        "router_vs_class_best_map": best_match_accuracy(expert, true, n, n),
        "router_vs_rule_best_map": best_match_accuracy(expert, rule, n, n),
        "router_vs_rule_prior_map": float(np.mean(expert == rule)),
        "rule_vs_class": float(np.mean(rule == true)),
    }


def sign_accuracy(pred: pd.DataFrame) -> dict[str, float]:
    """Hit rate of the next-return sign for both networks and for 'always up'."""
    s = pred["target_sign"].to_numpy()
    ok = ~np.isnan(s)
    return {
        "moe": float(np.mean((pred["sign_prob_moe"].to_numpy()[ok] > 0.5) == (s[ok] > 0.5))),
        "dense": float(np.mean((pred["sign_prob_dense"].to_numpy()[ok] > 0.5) == (s[ok] > 0.5))),
        "always_up": float(np.mean(s[ok] > 0.5)),
    }
