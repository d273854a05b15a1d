"""`moekit finance demo`: real market data routed to asset-class experts, over seeds.

On the offline `arch` data (default), the user's CSV files or downloaded tickers, it runs the
finance pipeline (`moekit.tasks.finance.pipeline`): walk-forward MoE vs dense, GARCH and
persistence, a 95% CI over seeds, Diebold-Mariano tests against GARCH, tables and plots.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from rich.console import Console

from moekit.commands import command, group, option

group("finance", "Finance MoE: real market data routed to asset-class experts.")


@dataclass
class FinanceDemo:
    """Where the data come from, the seeds and the walk-forward test years."""

    out: str = option("moekit-out/finance", "directory for tables, predictions and plots")
    seed: int = option(0, "first training seed")
    seeds: int = option(3, "training seeds (mean, 95 percent CI)")
    csv: list[str] | None = option(None, "PATH or PATH=<asset class> (repeatable)", repeat=True)
    tickers: list[str] = option([], "e.g. [SPY,TLT=Fixed Income]")
    start: str = option("2000-01-01", "tickers: first date")
    end: str | None = option(None, "tickers: last date")
    test_years: list[int] = option([], "default: the last 3")
    epochs: int | None = option(None, "training epochs (12)")


@command(
    "finance demo",
    FinanceDemo,
    help="The whole finance pipeline: the data shipped with `arch` (default), CSV files or "
    "tickers (needs moekit[finance-data] and a network).",
)
def finance_demo(cfg: FinanceDemo) -> dict[str, Any]:
    return run_demo(
        cfg.out, cfg.seed, seeds=cfg.seeds, csv=cfg.csv or (), tickers=cfg.tickers,
        start=cfg.start, end=cfg.end, test_years=tuple(cfg.test_years) or None, epochs=cfg.epochs,
    )  # fmt: skip


def run_demo(
    out_dir: str = "moekit-out/finance",
    seed: int = 0,
    console: Console | None = None,
    *,
    seeds: int = 3,
    csv: list[str] | tuple[str, ...] = (),
    tickers: list[str] | tuple[str, ...] = (),
    start: str = "2000-01-01",
    end: str | None = None,
    test_years: tuple[int, ...] | None = None,
    epochs: int | None = None,
) -> dict[str, Any]:
    """Run the demo and return the results dict (keys: table, summary, dm_vs_garch, agreement,
    sign_accuracy, folds, plots, runtime_s, predictions, ...). Without `csv` or `tickers` the
    data are the offline ``arch`` series and the test years 2015-2018."""
    # pandas, arch and scipy (moekit[finance]) load here, so the command parses without them
    from moekit.tasks.finance.pipeline import (
        DemoConfig,
        default_test_years,
        load_instruments,
        run_pipeline,
    )
    from moekit.viz.finance import make_all

    instruments = load_instruments(csv, tickers, start, end)
    cfg = DemoConfig()
    if csv or tickers or test_years:
        years = tuple(test_years) if test_years else default_test_years(instruments)
        cfg = replace(cfg, walk_forward=replace(cfg.walk_forward, test_years=years))
    cfg = replace(cfg, model=replace(cfg.model, seed=seed, epochs=epochs or cfg.model.epochs))
    return run_pipeline(instruments, cfg, out_dir, console, seeds, draw=make_all)
