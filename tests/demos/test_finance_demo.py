"""`moekit finance demo` on CSV files over two seeds: CIs, DM tests, readable plots."""

import json
import sys

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from moekit.cli import main
from moekit.tasks.finance.pipeline import default_test_years
from moekit.viz import finance as plots
from moekit.viz import read_panels
from moekit.viz.style import text_overlaps


def _prices_csv(path, vol, seed, garch_sim):
    dates = pd.bdate_range("2011-01-03", "2015-12-31")
    price = 100 * np.exp(np.cumsum(garch_sim(len(dates), vol, seed)))
    pd.DataFrame({"Date": dates.strftime("%Y-%m-%d"), "Close": price}).to_csv(path, index=False)
    return path


def test_demo_on_csv_files_over_two_seeds(tmp_path, garch_sim, capsys):
    eq = _prices_csv(tmp_path / "eq.csv", 0.012, 1, garch_sim)
    co = _prices_csv(tmp_path / "co.csv", 0.025, 2, garch_sim)
    out = tmp_path / "out"
    argv = ["finance", "demo", "--csv", str(eq), "--csv", f"{co}=Commodities", "--seeds", "2"]
    assert main([*argv, "--epochs", "1", "--test-years", "[2015]", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Diebold-Mariano" in printed and "[" in printed  # CI brackets in the tables
    res = json.loads((out / "results.json").read_text())
    assert res["seeds"] == 2 and [i["name"] for i in res["instruments"]] == ["eq", "co"]
    assert [f["test_year"] for f in res["folds"]] == [2015]
    moe = [r for r in res["summary"] if r["method"] == "MoE" and r["metric"] == "qlike"]
    assert all(r["seeds"] == 2 and r["low"] <= r["mean"] <= r["high"] for r in moe)
    dm = {r["group"]: r for r in res["dm_vs_garch"]}
    assert {"Equities", "Commodities", "All", "eq", "co"} <= set(dm)
    assert dm["eq"]["horizon"] == 5 and 0 <= dm["All"]["p_value"] <= 1
    for path in res["plots"].values():
        assert imread(path).ndim == 3
    assert read_panels(res["plots"]["seeds"]) == [
        "QLIKE by asset class",
        "Diebold-Mariano: MoE vs GARCH (QLIKE)",
    ]
    pred = pd.read_csv(out / "predictions.csv", parse_dates=["date"])
    by_inst = pd.DataFrame(res["by_instrument"])
    summary = pd.DataFrame(res["summary"])
    figures = [
        plots.routing_heatmap_figure(pred),
        plots.conditions_scatter_figure(pred),
        plots.confidence_timeseries_figure(pred),
        plots.performance_vs_preference_figure(by_inst),
        plots.seeds_figure(
            summary[summary["metric"] == "qlike"], pd.DataFrame(res["dm_vs_garch"]), 2
        ),
    ]
    assert [text_overlaps(fig) for fig in figures] == [[]] * 5


def test_default_test_years_are_the_last_three_after_two_to_train_on(small_universe):
    assert default_test_years(small_universe) == (2013, 2014, 2015)
    with pytest.raises(ValueError, match="3 or more"):
        default_test_years([])


def test_tickers_without_yfinance_fail_in_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "yfinance", None)  # importing it now fails, as when missing
    with pytest.raises(SystemExit) as exit_info:
        main(["finance", "demo", "--tickers", "[SPY,TLT=Fixed Income]", "--start", "2015-01-01"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "moekit[finance-data]" in err and "--csv" in err


def test_bad_asset_class_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["finance", "demo", "--csv", f"{tmp_path / 'x.csv'}=Crypto"])
    assert "asset class 'Crypto'" in capsys.readouterr().err
