"""Cleaning rules: every repair is logged, every rejection names the file and the row."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from moekit.tasks.finance.clean import clean_price_frame, infer_frequency
from moekit.tasks.finance.data import load_csv


def frame(dates: list[str], prices: list, volume: list | None = None) -> pd.DataFrame:
    df = pd.DataFrame({"date": dates, "price": prices})
    if volume is not None:
        df["volume"] = volume
    return df


DATES = ["2020-01-06", "2020-01-07", "2020-01-08", "2020-01-09", "2020-01-10"]


def test_clean_passthrough_keeps_rows_and_order() -> None:
    out = clean_price_frame(frame(DATES, [1, 2, 3, 4, 5]), "f.csv", "D")
    assert list(out["price"]) == [1, 2, 3, 4, 5]
    assert list(out["row"]) == [1, 2, 3, 4, 5]
    assert not out["after_gap"].any()
    assert out.attrs["freq"] == "D"


def test_unsorted_rows_are_sorted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        out = clean_price_frame(frame(DATES[::-1], [5, 4, 3, 2, 1]), "f.csv", "D")
    assert list(out.index) == list(pd.to_datetime(DATES))
    assert list(out["price"]) == [1, 2, 3, 4, 5]
    assert "not in date order" in caplog.text


def test_exact_duplicates_dropped_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    dates = [DATES[0], DATES[1], DATES[1], DATES[2]]
    with caplog.at_level(logging.WARNING):
        out = clean_price_frame(frame(dates, [1, 2, 2, 3]), "f.csv", "D")
    assert list(out["price"]) == [1, 2, 3]
    assert "duplicate" in caplog.text and "rows 3" in caplog.text


def test_conflicting_duplicates_rejected_with_rows() -> None:
    dates = [DATES[0], DATES[1], DATES[1], DATES[2]]
    with pytest.raises(ValueError, match=r"prices\.csv: rows 2, 3: duplicated date 2020-01-07"):
        clean_price_frame(frame(dates, [1, 2, 2.5, 3]), "prices.csv", "D")


def test_missing_prices_dropped_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        out = clean_price_frame(frame(DATES, [1, None, ".", 4, 5]), "f.csv", "D")
    assert list(out["price"]) == [1, 4, 5]
    assert "missing price" in caplog.text and "rows 2, 3" in caplog.text


def test_malformed_number_rejected_with_row() -> None:
    with pytest.raises(ValueError, match=r"f\.csv: row 4: malformed price value 'abc'"):
        clean_price_frame(frame(DATES, ["1", "2", "3", "abc", "5"]), "f.csv", "D")


@pytest.mark.parametrize("bad", [0.0, -3.0])
def test_non_positive_price_rejected_with_row(bad: float) -> None:
    with pytest.raises(ValueError, match=r"x\.csv: row 3: non-positive price"):
        clean_price_frame(frame(DATES, [1, 2, bad, 4, 5]), "x.csv", "D")


def test_negative_volume_rejected_with_row() -> None:
    with pytest.raises(ValueError, match=r"x\.csv: row 2: negative volume"):
        clean_price_frame(frame(DATES, [1, 2, 3, 4, 5], [10, -1, 10, 10, 10]), "x.csv", "D")


def test_unparseable_date_rejected_with_row() -> None:
    dates = [DATES[0], "not-a-date", *DATES[2:]]
    with pytest.raises(ValueError, match=r"x\.csv: row 2: unparseable date 'not-a-date'"):
        clean_price_frame(frame(dates, [1, 2, 3, 4, 5]), "x.csv", "D")


def test_gap_marks_return_unusable_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    dates = ["2020-01-06", "2020-01-07", "2020-02-10", "2020-02-11"]
    with caplog.at_level(logging.WARNING):
        out = clean_price_frame(frame(dates, [1, 2, 3, 4]), "g.csv", "D")
    assert list(out["after_gap"]) == [False, False, True, False]
    assert "gap of 34 days before row 3" in caplog.text


def test_infer_frequency() -> None:
    assert infer_frequency(pd.bdate_range("2020-01-01", periods=30), "f") == "D"
    assert infer_frequency(pd.date_range("2020-01-31", periods=30, freq="ME"), "f") == "M"
    with pytest.raises(ValueError, match="neither daily nor monthly"):
        infer_frequency(pd.date_range("2020-01-01", periods=30, freq="YE"), "f")


def test_load_csv_yahoo_layout_uses_adj_close_and_skips_gap(tmp_path) -> None:
    path = tmp_path / "spy.csv"
    dates = pd.bdate_range("2020-01-01", periods=40)
    dates = dates.delete(range(10, 25))  # a 3-week hole
    adj = np.linspace(100, 120, len(dates))
    pd.DataFrame(
        {"Date": dates.strftime("%Y-%m-%d"), "Open": 1, "High": 1, "Low": 1, "Close": 1,
         "Adj Close": adj, "Volume": 1000}
    ).to_csv(path, index=False)  # fmt: skip
    inst = load_csv(path, "Equities")
    assert inst.name == "spy" and inst.freq == "D" and inst.volume is not None
    # len(dates) prices -> len - 1 returns, minus the one spanning the hole
    assert len(inst.returns) == len(dates) - 2
    assert dates[10] not in inst.returns.index
    assert np.isclose(inst.returns.iloc[0], np.log(adj[1] / adj[0]))


def test_load_csv_value_layout_and_bad_class(tmp_path) -> None:
    path = tmp_path / "bond.csv"
    dates = pd.date_range("2000-01-31", periods=24, freq="ME")
    pd.DataFrame({"Date": dates, "Value": np.linspace(1, 2, 24)}).to_csv(path, index=False)
    inst = load_csv(path, "Fixed Income", name="B")
    assert (inst.name, inst.freq, inst.volume) == ("B", "M", None)
    assert len(inst.returns) == 23
    with pytest.raises(ValueError, match="asset_class"):
        load_csv(path, "Crypto")


def test_load_csv_unknown_layout_names_file(tmp_path) -> None:
    path = tmp_path / "odd.csv"
    pd.DataFrame({"Date": ["2020-01-01"], "Price": [1]}).to_csv(path, index=False)
    with pytest.raises(ValueError, match="odd.csv: expected Yahoo layout"):
        load_csv(path, "Equities")
