"""Validation and repair of raw price tables.

Every repair follows a fixed rule and is logged; anything that cannot be repaired without
guessing (unparseable dates, non-positive prices, conflicting duplicates) raises a
``ValueError`` that names the source file and the data row (1-based, header excluded), so a
series is never silently misaligned.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

#: Tokens read as "missing" rather than as malformed numbers (FRED uses ".").
MISSING_TOKENS = frozenset({"", ".", "na", "n/a", "nan", "null", "none", "-"})

#: Largest calendar gap (days) between consecutive observations before the return across it
#: is discarded, per sampling frequency.
MAX_GAP_DAYS = {"D": 10, "M": 45}


def _rows(rows: pd.Series | list[int], limit: int = 10) -> str:
    """Format a list of row numbers for a message."""
    rows = [int(r) for r in rows]
    text = ", ".join(str(r) for r in rows[:limit])
    return text + (f", ... ({len(rows)} in all)" if len(rows) > limit else "")


def _to_number(raw: pd.Series, source: str, column: str) -> pd.Series:
    """Parse a column to float; missing tokens -> NaN, any other non-number -> ValueError."""
    values = pd.to_numeric(raw, errors="coerce")
    bad = values.isna() & raw.notna()
    if bad.any():
        tokens = raw[bad].astype(str).str.strip().str.lower()
        malformed = tokens[~tokens.isin(MISSING_TOKENS)]
        if len(malformed):
            idx = malformed.index[0]
            raise ValueError(
                f"{source}: row {idx + 1}: malformed {column} value {raw[idx]!r} "
                "(not a number and not a missing-value marker)"
            )
    return values.astype(float)


def infer_frequency(dates: pd.DatetimeIndex, source: str) -> str:
    """Return ``"D"`` (daily/business-day) or ``"M"`` (monthly) from the median date spacing."""
    if len(dates) < 3:
        raise ValueError(f"{source}: need at least 3 dated rows to infer the frequency")
    median = float(np.median(np.diff(dates.values).astype("timedelta64[D]").astype(float)))
    if median <= 5:
        return "D"
    if 20 <= median <= 40:
        return "M"
    raise ValueError(
        f"{source}: median spacing of {median:.0f} days is neither daily nor monthly; "
        "pass freq='D' or freq='M' after resampling"
    )


def clean_price_frame(raw: pd.DataFrame, source: str, freq: str | None = None) -> pd.DataFrame:
    """Validate a raw ``date, price[, volume]`` table and return a clean, dated frame.

    ``raw`` rows are in file order (row ``i`` of the frame is data row ``i + 1``). Returns a
    frame indexed by sorted unique dates with columns ``price``, ``volume`` (NaN when absent),
    ``row`` (original data row) and ``after_gap`` (True where the return into this row spans
    a gap longer than :data:`MAX_GAP_DAYS` and must not be used). Rules, in order:

    1. unparseable date -> ``ValueError``;
    2. missing price -> row dropped (logged);
    3. price <= 0 -> ``ValueError``; negative volume -> ``ValueError``;
    4. rows out of date order -> stably sorted (logged);
    5. duplicated date with identical values -> later copies dropped (logged); with different
       values -> ``ValueError`` naming both rows;
    6. gap longer than the frequency's limit -> return across it discarded (logged).
    """
    for col in ("date", "price"):
        if col not in raw.columns:
            raise ValueError(f"{source}: missing required column {col!r}")
    raw = raw.reset_index(drop=True)
    frame = pd.DataFrame({"row": np.arange(1, len(raw) + 1)})
    dates = pd.to_datetime(raw["date"], errors="coerce")
    if dates.isna().any():
        i = int(np.flatnonzero(dates.isna().to_numpy())[0])
        raise ValueError(f"{source}: row {i + 1}: unparseable date {raw['date'][i]!r}")
    frame["date"] = dates.dt.tz_localize(None) if dates.dt.tz is not None else dates
    frame["price"] = _to_number(raw["price"], source, "price")
    if "volume" in raw.columns:
        frame["volume"] = _to_number(raw["volume"], source, "volume")
    else:
        frame["volume"] = np.nan

    missing = frame["price"].isna()
    if missing.any():
        logger.warning(
            "%s: dropped %d row(s) with a missing price (rows %s); the next return spans them",
            source,
            int(missing.sum()),
            _rows(frame.loc[missing, "row"]),
        )
        frame = frame.loc[~missing]
    bad = frame["price"] <= 0
    if bad.any():
        r = frame.loc[bad].iloc[0]
        raise ValueError(
            f"{source}: row {int(r['row'])}: non-positive price {r['price']!r} on "
            f"{r['date'].date()} (log returns are undefined; fix or remove the row)"
        )
    bad = frame["volume"] < 0
    if bad.any():
        r = frame.loc[bad].iloc[0]
        raise ValueError(f"{source}: row {int(r['row'])}: negative volume {r['volume']!r}")

    if not frame["date"].is_monotonic_increasing:
        logger.warning("%s: rows were not in date order; sorted by date", source)
        frame = frame.sort_values("date", kind="stable")

    dup = frame["date"].duplicated(keep=False)
    if dup.any():
        for date, group in frame.loc[dup].groupby("date", sort=True):
            values = group[["price", "volume"]].to_numpy()
            same = np.all(np.isclose(values, values[0], equal_nan=True))
            if not same:
                raise ValueError(
                    f"{source}: rows {_rows(group['row'])}: duplicated date {date.date()} "
                    "with different values; keep one row"
                )
        drop = frame["date"].duplicated(keep="first")
        logger.warning(
            "%s: dropped %d exact duplicate row(s) (rows %s)",
            source,
            int(drop.sum()),
            _rows(frame.loc[drop, "row"]),
        )
        frame = frame.loc[~drop]

    if len(frame) < 3:
        raise ValueError(f"{source}: fewer than 3 usable rows after cleaning")
    freq = freq or infer_frequency(pd.DatetimeIndex(frame["date"]), source)
    if freq not in MAX_GAP_DAYS:
        raise ValueError(f"{source}: freq must be 'D' or 'M', got {freq!r}")
    gaps = frame["date"].diff().dt.days
    frame["after_gap"] = (gaps > MAX_GAP_DAYS[freq]).to_numpy()
    for i in np.flatnonzero(frame["after_gap"].to_numpy()):
        logger.warning(
            "%s: gap of %d days before row %d (%s); the return across it is not used",
            source,
            int(gaps.iloc[i]),
            int(frame["row"].iloc[i]),
            frame["date"].iloc[i].date(),
        )
    frame = frame.set_index("date")
    frame.attrs["freq"] = freq
    return frame[["price", "volume", "row", "after_gap"]]
