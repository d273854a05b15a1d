"""The finance pipeline: market data -> features -> walk-forward MoE vs baselines, over seeds.

``run_pipeline`` trains the networks with several seeds, prints each method's metrics as the
mean over seeds with a 95% confidence interval, tests MoE against GARCH (Diebold-Mariano),
writes ``results.json``, ``predictions.csv`` and the PNGs its `draw` makes to ``out_dir``, and
returns the results; ``moekit finance demo`` (``moekit.demos.finance_demo``) runs it on chosen
data and draws with ``moekit.viz.finance``.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from rich.console import Console
from rich.table import Table

from moekit.progress import progress
from moekit.tasks.finance.data import (
    ASSET_CLASSES,
    Instrument,
    load_arch_instruments,
    load_csv,
    load_tickers,
)
from moekit.tasks.finance.evaluate import (
    METHODS,
    WalkForwardConfig,
    metrics_by_class,
    metrics_by_instrument,
    qlike,
    routing_agreement,
    run_walk_forward,
    sign_accuracy,
)
from moekit.tasks.finance.features import FeatureConfig, build_panel
from moekit.tasks.finance.model import ForecastConfig
from moekit.tasks.finance.rules import RuleConfig
from moekit.tasks.finance.stats import dm_by_group, mean_ci

METHOD_NAMES = {"moe": "MoE", "dense": "Dense", "garch": "GARCH(1,1)", "persist": "Persistence"}


@dataclass(frozen=True)
class DemoConfig:
    """All settings of one pipeline run."""

    features: FeatureConfig = field(default_factory=FeatureConfig)
    walk_forward: WalkForwardConfig = field(
        default_factory=lambda: WalkForwardConfig(test_years=(2015, 2016, 2017, 2018))
    )
    model: ForecastConfig = field(
        default_factory=lambda: ForecastConfig(epochs=12, batch_size=1024)
    )
    rules: RuleConfig = field(default_factory=RuleConfig)
    make_plots: bool = True

    def __post_init__(self) -> None:
        for name, kind in (
            ("features", FeatureConfig),
            ("walk_forward", WalkForwardConfig),
            ("model", ForecastConfig),
            ("rules", RuleConfig),
        ):
            if not isinstance(getattr(self, name), kind):
                raise ValueError(f"{name}: expected a {kind.__name__}")


def comparison_table(table: pd.DataFrame, metric: str, title: str) -> Table:
    """One metric ("qlike" or "mse") per asset class and method as a rich Table; the best
    method of each row is bold."""
    t = Table(title=title)
    t.add_column("asset class")
    t.add_column("rows", justify="right")
    for m in METHODS:
        t.add_column(METHOD_NAMES[m], justify="right")
    for _, r in table.iterrows():
        vals = [float(r[f"{metric}_{m}"]) for m in METHODS]
        best = min(vals)
        cells = [f"[bold]{v:.3f}[/bold]" if v == best else f"{v:.3f}" for v in vals]
        t.add_row(str(r["asset_class"]), str(int(r["n"])), *cells)
    return t


def instrument_table(by_inst: pd.DataFrame) -> Table:
    """Per instrument: its most-used expert (with that expert's prior class) and QLIKE."""
    t = Table(title="QLIKE and routing per instrument")
    for col in ("instrument", "class", "top expert", "share"):
        t.add_column(col, justify="right" if col == "share" else "left")
    for m in METHODS[:3]:
        t.add_column(METHOD_NAMES[m], justify="right")
    for _, r in by_inst.iterrows():
        e = int(r["top_expert"])
        t.add_row(
            str(r["instrument"]),
            str(r["asset_class"]),
            f"{e} ({ASSET_CLASSES[e]})",
            f"{r['top_expert_share']:.2f}",
            *[f"{r[f'qlike_{m}']:.3f}" for m in METHODS[:3]],
        )
    return t


def markdown_table(table: pd.DataFrame) -> str:
    """The same table as GitHub markdown (used for the guide)."""
    head = ["asset class", "rows"] + [
        f"{metric} {METHOD_NAMES[m]}" for metric in ("QLIKE", "MSE") for m in METHODS
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in table.iterrows():
        vals = [f"{r[f'{metric}_{m}']:.3f}" for metric in ("qlike", "mse") for m in METHODS]
        lines.append("| " + " | ".join([str(r["asset_class"]), str(int(r["n"])), *vals]) + " |")
    return "\n".join(lines)


def seed_summary(tables: list[pd.DataFrame]) -> pd.DataFrame:
    """Per asset class, method and metric: mean over seeds and its 95% confidence interval."""
    rows = []
    for cls in tables[0]["asset_class"]:
        for metric in ("qlike", "mse"):
            for m in METHODS:
                values = [
                    float(t.set_index("asset_class").loc[cls, f"{metric}_{m}"]) for t in tables
                ]
                ci = mean_ci(values)
                rows.append(
                    {"asset_class": cls, "metric": metric, "method": METHOD_NAMES[m],
                     "mean": ci.mean, "low": ci.low, "high": ci.high, "seeds": ci.n}
                )  # fmt: skip
    return pd.DataFrame(rows)


def dm_tests(preds: list[pd.DataFrame], features: FeatureConfig) -> pd.DataFrame:
    """Diebold-Mariano tests of MoE (its QLIKE averaged over seeds) against GARCH, per asset
    class present, over all rows, and per instrument."""
    base = preds[0][["date", "instrument", "asset_class", "freq"]].copy()
    moe = np.mean([qlike(p["target_logvol"], p["pred_moe"]) for p in preds], axis=0)
    base["diff"] = moe - qlike(preds[0]["target_logvol"], preds[0]["pred_garch"])
    horizon = {"D": features.daily_horizon, "M": features.monthly_horizon}
    groups = [
        (c, base["asset_class"] == c) for c in ASSET_CLASSES if (base["asset_class"] == c).any()
    ]
    groups.append(("All", base["asset_class"].notna()))
    groups += [(n, base["instrument"] == n) for n in dict.fromkeys(base["instrument"])]
    return pd.DataFrame(dm_by_group(base, "diff", horizon, groups))


def summary_table(summary: pd.DataFrame, metric: str, title: str) -> Table:
    """Mean over seeds [95% CI] of one metric per asset class and method; the best mean bold."""
    t = Table(title=title)
    t.add_column("asset class")
    for m in METHODS:
        t.add_column(METHOD_NAMES[m], justify="right")
    rows = summary[summary["metric"] == metric]
    for cls in dict.fromkeys(rows["asset_class"]):
        part = rows[rows["asset_class"] == cls].set_index("method")
        best = part["mean"].min()
        cells = []
        for m in METHODS:
            r = part.loc[METHOD_NAMES[m]]
            text = f"{r['mean']:.3f}" + (
                f" [{r['low']:.3f}, {r['high']:.3f}]" if np.isfinite(r["low"]) else ""
            )
            cells.append(f"[bold]{text}[/bold]" if r["mean"] == best else text)
        t.add_row(str(cls), *cells)
    return t


def dm_table(dm: pd.DataFrame) -> Table:
    """One row per group: rows tested, mean QLIKE difference, DM statistic, p-value, horizon."""
    t = Table(title="Diebold-Mariano test, MoE vs GARCH(1,1) on QLIKE (stat < 0: MoE better)")
    t.add_column("group")
    for col in ("dates", "mean QLIKE difference", "DM stat", "p-value", "horizon"):
        t.add_column(col, justify="right")
    for _, r in dm.iterrows():
        t.add_row(
            str(r["group"]), str(r["n"]), f"{r['mean_diff']:+.4f}", f"{r['stat']:.2f}",
            f"{r['p_value']:.3f}", str(r["horizon"]),
        )  # fmt: skip
    return t


def run_pipeline(
    instruments: list[Instrument],
    cfg: DemoConfig,
    out_dir: str | Path,
    console: Console | None = None,
    seeds: int = 1,
    draw: Callable[..., dict[str, str]] | None = None,
) -> dict[str, Any]:
    """Features, walk-forward fits for `seeds` training seeds (cfg.model.seed, +1, ...),
    metrics with confidence intervals, DM tests, plots and ``results.json``.

    The plots are those `draw(pred, by_inst, out_dir, (qlike summary, dm, seeds))` writes
    and names (the demo passes `moekit.viz.finance.make_all`), when `cfg.make_plots`."""
    if seeds < 1:
        raise ValueError(f"seeds={seeds} must be >= 1")
    console = console or Console()
    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    panel = build_panel(instruments, cfg.features)
    results_by_seed = []
    folds = len(cfg.walk_forward.test_years)
    with progress("finance walk-forward", seeds * folds) as advance:
        for i in range(seeds):
            model = replace(cfg.model, seed=cfg.model.seed + i)

            def done(year: int, seed: int = model.seed) -> None:
                advance(f"seed {seed}, test year {year}")

            results_by_seed.append(
                run_walk_forward(instruments, panel, cfg.walk_forward, model, cfg.rules, done)
            )
    result = results_by_seed[0]
    preds = [r.predictions for r in results_by_seed]
    pred = result.predictions
    tables = [metrics_by_class(p) for p in preds]
    summary = seed_summary(tables)
    table = tables[0].copy()
    for col in table.columns[2:]:  # the mean over seeds of every metric column
        table[col] = np.mean([t[col].to_numpy() for t in tables], axis=0)
    dm = dm_tests(preds, cfg.features)
    by_inst = metrics_by_instrument(pred)
    agreement = routing_agreement(pred)
    signs = sign_accuracy(pred)
    plot_paths = (
        draw(pred, by_inst, out, (summary[summary["metric"] == "qlike"], dm, seeds))
        if cfg.make_plots and draw is not None
        else {}
    )
    runtime = time.perf_counter() - start

    years = cfg.walk_forward.test_years
    span = f"walk-forward test years {years[0]}-{years[-1]}, {seeds} seed(s)"
    console.print(
        summary_table(summary, "qlike", f"QLIKE of variance forecasts, {span}; mean [95% CI]")
    )
    console.print(
        summary_table(summary, "mse", f"MSE of log-volatility forecasts, {span}; mean [95% CI]")
    )
    console.print(dm_table(dm))
    console.print(instrument_table(by_inst))
    console.print(
        "Routing agreement (top-1 expert, first seed): "
        + ", ".join(f"{k}={v:.3f}" for k, v in agreement.items())
    )
    console.print(
        "Next-return sign hit rate: " + ", ".join(f"{k}={v:.3f}" for k, v in signs.items())
    )
    for name, path in plot_paths.items():
        console.print(f"plot {name}: {path}")
    console.print(f"runtime {runtime:.1f} s")

    results: dict[str, Any] = {
        "table": table.to_dict(orient="records"),
        "table_markdown": markdown_table(table),
        "seeds": seeds,
        "summary": summary.to_dict(orient="records"),
        "dm_vs_garch": dm.to_dict(orient="records"),
        "by_instrument": by_inst.to_dict(orient="records"),
        "agreement": agreement,
        "sign_accuracy": signs,
        "folds": result.folds,
        "plots": plot_paths,
        "instruments": [
            {"name": i.name, "asset_class": i.asset_class, "freq": i.freq, "n": len(i.returns)}
            for i in instruments
        ],
        "expert_prior_classes": list(ASSET_CLASSES),
        "runtime_s": runtime,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "config": asdict(cfg),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    pred.to_csv(out / "predictions.csv", index=False)
    results["predictions"] = pred
    return results


def _named(spec: str, what: str) -> tuple[str, str]:
    """'NAME=Asset class' -> (NAME, class); a bare NAME is Equities."""
    name, _, cls = spec.partition("=")
    cls = cls.strip() or "Equities"
    if not name.strip():
        raise ValueError(f"{what}={spec!r}: give NAME or NAME=<asset class>")
    if cls not in ASSET_CLASSES:
        raise ValueError(f"{what}={spec!r}: asset class {cls!r} is not one of {ASSET_CLASSES}")
    return name.strip(), cls


def load_instruments(
    csv: list[str] | tuple[str, ...] = (),
    tickers: list[str] | tuple[str, ...] = (),
    start: str = "2000-01-01",
    end: str | None = None,
) -> list[Instrument]:
    """CSV files ('path' or 'path=Asset class') and tickers ('SPY' or 'TLT=Fixed Income');
    with neither, the offline ``arch`` series."""
    if not csv and not tickers:
        return load_arch_instruments()
    out = [load_csv(path, cls) for path, cls in (_named(c, "--csv") for c in csv)]
    if tickers:
        out += load_tickers(dict(_named(t, "--tickers") for t in tickers), start, end)
    return out


def default_test_years(instruments: list[Instrument], n: int = 3) -> tuple[int, ...]:
    """The last n calendar years with data, leaving at least two earlier years to train on."""
    years = sorted({y for i in instruments for y in i.returns.index.year})
    usable = years[2:]
    if not usable:
        raise ValueError(
            f"the data spans {len(years)} calendar year(s); the walk-forward needs 3 or more"
        )
    return tuple(usable[-n:])
