"""Market data sources: the offline series shipped with ``arch``, user CSVs and tickers.

Every source is reduced to an :class:`Instrument`: a log-return series at its native
frequency plus an asset-class tag. Monthly observations are stamped at month end, when
they become known, so that date-based splits never see them early.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from moekit.tasks.finance.clean import clean_price_frame

#: Asset classes, in expert order (expert ``i`` is the prior expert for class ``i``).
ASSET_CLASSES: tuple[str, ...] = (
    "Equities",
    "Fixed Income",
    "Commodities",
    "FX",
    "Derivatives",
    "Credit",
)

#: Trading days per period, used to put monthly volatilities on a daily scale.
DAYS_PER_PERIOD = {"D": 1, "M": 21}

#: Assumed modified duration of the long corporate bonds behind Moody's AAA/BAA yields,
#: used to turn monthly yield changes into approximate bond returns.
BOND_DURATION = 12.0


@dataclass
class Instrument:
    """One tradable (or proxy) series: log returns at native frequency and its asset class.

    ``returns`` are log returns indexed by date (sorted, unique, finite); ``volume`` is
    aligned with ``returns`` or ``None``.
    """

    name: str
    asset_class: str
    freq: str
    returns: pd.Series
    volume: pd.Series | None = None
    source: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("name: must be a non-empty string")
        if self.asset_class not in ASSET_CLASSES:
            raise ValueError(f"asset_class: {self.asset_class!r} not in {ASSET_CLASSES}")
        if self.freq not in DAYS_PER_PERIOD:
            raise ValueError(f"freq: must be 'D' or 'M', got {self.freq!r}")
        idx = self.returns.index
        if not isinstance(idx, pd.DatetimeIndex) or not idx.is_monotonic_increasing:
            raise ValueError(f"returns: {self.name} needs a sorted DatetimeIndex")
        if idx.has_duplicates:
            raise ValueError(f"returns: {self.name} has duplicated dates")
        if not np.isfinite(self.returns.to_numpy(dtype=float)).all():
            raise ValueError(f"returns: {self.name} has non-finite values")
        if self.volume is not None and not self.volume.index.equals(idx):
            raise ValueError(f"volume: {self.name} is not aligned with returns")

    @property
    def days_per_period(self) -> int:
        """Trading days in one observation period (1 daily, 21 monthly)."""
        return DAYS_PER_PERIOD[self.freq]


def _returns_from_clean(clean: pd.DataFrame) -> pd.Series:
    """Log returns of a cleaned price frame, without returns that span a gap."""
    r = np.log(clean["price"]).diff()
    keep = r.notna() & ~clean["after_gap"]
    return r[keep].astype(float)


def instrument_from_prices(
    clean: pd.DataFrame, name: str, asset_class: str, source: str
) -> Instrument:
    """Build an :class:`Instrument` from :func:`clean_price_frame` output."""
    r = _returns_from_clean(clean)
    vol = clean["volume"].reindex(r.index)
    has_volume = bool(vol.notna().any() and (vol.fillna(0) > 0).any())
    return Instrument(
        name, asset_class, clean.attrs["freq"], r, vol if has_volume else None, source
    )


def bond_returns_from_yields(
    yields_pct: pd.Series, duration: float = BOND_DURATION, periods_per_year: int = 12
) -> pd.Series:
    """Approximate log returns of a constant-duration bond from its yield (percent).

    ``r_t = y_{t-1} / periods_per_year - duration * (y_t - y_{t-1})`` (carry plus
    first-order price change), in decimal, then ``log(1 + r)``.
    """
    y = yields_pct / 100.0
    r = y.shift(1) / periods_per_year - duration * y.diff()
    return np.log1p(r.dropna())


def _month_end(index: pd.Index) -> pd.DatetimeIndex:
    return pd.DatetimeIndex(index).to_period("M").to_timestamp(how="end").normalize()


def _clean_series(series: pd.Series, source: str, freq: str) -> pd.DataFrame:
    raw = pd.DataFrame({"date": series.index, "price": series.to_numpy()})
    return clean_price_frame(raw, source, freq)


def load_arch_instruments() -> list[Instrument]:
    """The offline real series in ``arch.data``, tagged with asset classes.

    SP500, NASDAQ (daily, Equities); WTI spot (daily, Commodities); VIX index (daily,
    Derivatives: VIX itself is not traded, it stands in for volatility derivatives);
    Fama-French market excess return (monthly, Equities); Brent (monthly average,
    Commodities); Moody's AAA yield as a bond-return proxy (monthly, Fixed Income); BAA-AAA
    spread as a credit-return proxy (monthly, Credit). ``arch.data`` has no FX series.
    """
    mods = {
        n: importlib.import_module(f"arch.data.{n}")
        for n in ("sp500", "nasdaq", "wti", "vix", "frenchdata", "crude", "default")
    }
    out: list[Instrument] = []
    for key, name in (("sp500", "SP500"), ("nasdaq", "NASDAQ")):
        df = mods[key].load()
        raw = pd.DataFrame(
            {"date": df.index, "price": df["Adj Close"].to_numpy(), "volume": df["Volume"]}
        ).reset_index(drop=True)
        out.append(
            instrument_from_prices(
                clean_price_frame(raw, f"arch.data.{key}", "D"), name, "Equities", key
            )
        )
    wti = mods["wti"].load()["DCOILWTICO"]
    out.append(
        instrument_from_prices(
            _clean_series(wti, "arch.data.wti", "D"), "WTI", "Commodities", "wti"
        )
    )
    vix = mods["vix"].load()["vix"]
    out.append(
        instrument_from_prices(
            _clean_series(vix, "arch.data.vix", "D"), "VIX", "Derivatives", "vix"
        )
    )

    ff = mods["frenchdata"].load()
    # The shipped index encodes yyyymm as nanoseconds since the epoch.
    yyyymm = pd.Index(ff.index.asi8).astype(str)
    ff.index = _month_end(pd.to_datetime(yyyymm, format="%Y%m"))
    level = 100.0 * np.exp(np.log1p(ff["Mkt-RF"] / 100.0).cumsum())
    out.append(
        instrument_from_prices(
            _clean_series(level, "arch.data.frenchdata", "M"), "MKT-RF", "Equities", "frenchdata"
        )
    )
    brent = mods["crude"].load()["Brent"]
    brent.index = _month_end(brent.index)
    out.append(
        instrument_from_prices(
            _clean_series(brent, "arch.data.crude", "M"), "BRENT", "Commodities", "crude"
        )
    )

    moody = mods["default"].load()
    moody.index = _month_end(moody.index)
    for name, cls, series in (
        ("AAA", "Fixed Income", moody["AAA"]),
        ("BAA-AAA", "Credit", moody["BAA"] - moody["AAA"]),
    ):
        clean = _clean_series(series, "arch.data.default", "M")
        r = bond_returns_from_yields(clean["price"])
        r = r[~clean["after_gap"].reindex(r.index)]
        out.append(Instrument(name, cls, "M", r, None, "default"))
    return out


def load_csv(
    path: str | Path, asset_class: str, name: str | None = None, freq: str | None = None
) -> Instrument:
    """Load a CSV in Yahoo Finance layout (Date, Open, High, Low, Close, Adj Close, Volume)
    or ``Date,Value`` layout as one :class:`Instrument` of the given asset class."""
    path = Path(path)
    if asset_class not in ASSET_CLASSES:
        raise ValueError(f"asset_class: {asset_class!r} not in {ASSET_CLASSES}")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    cols = {c.strip().lower(): c for c in df.columns}
    if "date" not in cols:
        raise ValueError(f"{path}: no 'Date' column (columns: {list(df.columns)})")
    price_col = next((cols[c] for c in ("adj close", "close", "value") if c in cols), None)
    if price_col is None:
        raise ValueError(
            f"{path}: expected Yahoo layout (Date, ..., Adj Close, Volume) or 'Date,Value'; "
            f"got columns {list(df.columns)}"
        )
    raw = pd.DataFrame({"date": df[cols["date"]], "price": df[price_col]})
    if "volume" in cols:
        raw["volume"] = df[cols["volume"]]
    clean = clean_price_frame(raw, str(path), freq)
    return instrument_from_prices(clean, name or path.stem, asset_class, str(path))


class MarketDataError(RuntimeError, ValueError):
    """Market data that cannot be had (package missing, offline, unknown ticker); the message
    says what to use instead. A ValueError too, so the `moekit` command prints one line."""


def load_tickers(
    tickers: dict[str, str], start: str = "2000-01-01", end: str | None = None
) -> list[Instrument]:
    """Download daily prices from `start` to `end` (None: today) with ``yfinance``
    (``{ticker: asset_class}``).

    Raises ``MarketDataError`` pointing to the offline options when ``yfinance`` is missing
    or the network is unreachable.
    """
    offline = (
        "offline, use the arch data (moekit finance demo; load_arch_instruments()) or a CSV "
        "file (--csv; load_csv(path, asset_class))"
    )
    try:
        yf = importlib.import_module("yfinance")
    except ImportError as err:
        need = "tickers need yfinance, which is missing (pip install 'moekit[finance-data]')"
        raise MarketDataError(f"{need}; {offline}") from err
    out = []
    for ticker, cls in tickers.items():
        try:
            df = yf.download(ticker, start=start, end=end, progress=False, auto_adjust=False)
        except Exception as err:  # network errors come in many types
            raise MarketDataError(f"downloading {ticker!r} failed ({err}); {offline}") from err
        if df is None or len(df) == 0:
            raise MarketDataError(f"no data for {ticker!r} (offline or unknown ticker); {offline}")
        if isinstance(df.columns, pd.MultiIndex):
            df.columns = df.columns.get_level_values(0)
        col = "Adj Close" if "Adj Close" in df.columns else "Close"
        raw = pd.DataFrame({"date": df.index, "price": df[col].to_numpy()})
        if "Volume" in df.columns:
            raw["volume"] = df["Volume"].to_numpy()
        clean = clean_price_frame(raw, f"yfinance:{ticker}", "D")
        out.append(instrument_from_prices(clean, ticker, cls, f"yfinance:{ticker}"))
    return out
