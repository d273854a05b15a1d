"""End-to-end demo: offline ``arch`` data -> features -> walk-forward MoE vs baselines.

``run_demo`` is what ``moekit finance demo`` calls: it prints the comparison table and the
plot paths, writes ``results.json`` and the PNGs to ``out_dir``, and returns the results.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from rich.console import Console
from rich.table import Table

from moekit.tasks.finance import plots
from moekit.tasks.finance.data import ASSET_CLASSES, Instrument, load_arch_instruments
from moekit.tasks.finance.evaluate import (
    METHODS,
    WalkForwardConfig,
    metrics_by_class,
    metrics_by_instrument,
    routing_agreement,
    run_walk_forward,
    sign_accuracy,
)
from moekit.tasks.finance.features import FeatureConfig, build_panel
from moekit.tasks.finance.model import ForecastConfig
from moekit.tasks.finance.rules import RuleConfig

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


def run_pipeline(
    instruments: list[Instrument],
    cfg: DemoConfig,
    out_dir: str | Path,
    console: Console | None = None,
) -> dict[str, Any]:
    """Features, walk-forward fits, metrics, plots and ``results.json`` for ``instruments``."""
    console = console or Console()
    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    panel = build_panel(instruments, cfg.features)
    result = run_walk_forward(instruments, panel, cfg.walk_forward, cfg.model, cfg.rules)
    pred = result.predictions
    table = metrics_by_class(pred)
    by_inst = metrics_by_instrument(pred)
    agreement = routing_agreement(pred)
    signs = sign_accuracy(pred)
    plot_paths = plots.make_all(pred, by_inst, out) if cfg.make_plots else {}
    runtime = time.perf_counter() - start

    years = cfg.walk_forward.test_years
    span = f"walk-forward test years {years[0]}-{years[-1]}"
    console.print(comparison_table(table, "qlike", f"QLIKE of variance forecasts, {span}"))
    console.print(comparison_table(table, "mse", f"MSE of log-volatility forecasts, {span}"))
    console.print(instrument_table(by_inst))
    console.print(
        "Routing agreement (top-1 expert): "
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


def run_demo(
    out_dir: str = "moekit-out/finance", seed: int = 0, console: Console | None = None
) -> dict[str, Any]:
    """Run the full demo on the offline ``arch`` data and return the results dict
    (keys: table, agreement, sign_accuracy, folds, plots, runtime_s, predictions, ...)."""
    cfg = DemoConfig()
    cfg = replace(cfg, model=replace(cfg.model, seed=seed))
    return run_pipeline(load_arch_instruments(), cfg, out_dir, console)
