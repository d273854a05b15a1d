"""The four demo figures, rendered off-screen with matplotlib's Agg canvas.

Figures are built with ``matplotlib.figure.Figure`` rather than pyplot, so no global backend
or figure registry is touched and nothing needs a display.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from moekit.tasks.finance.data import ASSET_CLASSES

N_EXPERTS = len(ASSET_CLASSES)


def _figure(figsize: tuple[float, float]) -> Figure:
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _colors() -> list:
    cmap = matplotlib.colormaps["tab10"]
    return [cmap(i) for i in range(N_EXPERTS)]


def _expert_label(e: int) -> str:
    return f"expert {e} (prior: {ASSET_CLASSES[e]})"


def routing_heatmap(pred: pd.DataFrame, path: Path) -> Path:
    """Instrument x expert over time: share of each month's rows routed to each expert."""
    names = list(dict.fromkeys(pred["instrument"]))
    months = pd.PeriodIndex(pd.DatetimeIndex(pred["date"]), freq="M")
    all_months = pd.period_range(months.min(), months.max(), freq="M")
    fig = _figure((11, 1.1 * len(names) + 1))
    axes = fig.subplots(len(names), 1, sharex=True, squeeze=False)
    im = None
    for ax, name in zip(axes[:, 0], names, strict=True):
        sel = (pred["instrument"] == name).to_numpy()
        share = pd.crosstab(months[sel], pred["expert"].to_numpy()[sel], normalize="index")
        share = share.reindex(index=all_months, columns=range(N_EXPERTS)).fillna(np.nan)
        im = ax.imshow(
            share.to_numpy().T, aspect="auto", vmin=0, vmax=1, cmap="viridis", interpolation="none"
        )
        cls = pred.loc[sel, "asset_class"].iloc[0]
        ax.set_ylabel(f"{name}\n{cls}", rotation=0, ha="right", va="center", fontsize=8)
        ax.set_yticks(range(N_EXPERTS))
        ax.set_yticklabels([str(e) for e in range(N_EXPERTS)], fontsize=6)
    ticks = np.arange(0, len(all_months), 3)
    axes[-1, 0].set_xticks(ticks)
    axes[-1, 0].set_xticklabels([str(all_months[i]) for i in ticks], rotation=45, fontsize=7)
    fig.colorbar(im, ax=axes[:, 0].tolist(), label="share of month's rows routed to expert")
    fig.suptitle("Learned router: expert (rows of each panel) per instrument and test month")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def conditions_scatter(pred: pd.DataFrame, path: Path) -> Path:
    """Market conditions (daily vol vs return) coloured by the chosen expert."""
    fig = _figure((8, 6))
    ax = fig.subplots()
    colors = _colors()
    for e in range(N_EXPERTS):
        g = pred[pred["expert"] == e]
        if len(g):
            ax.scatter(
                g["rv_rule_pct"], 100 * g["ret"], s=6, alpha=0.5, color=colors[e],
                label=_expert_label(e),
            )  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("realised volatility, daily scale (%, log axis)")
    ax.set_ylabel("return, daily scale (%)")
    ax.set_title("Market conditions of test rows, coloured by top-1 expert")
    ax.legend(fontsize=7, markerscale=2)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def confidence_timeseries(pred: pd.DataFrame, path: Path, window: int = 10) -> Path:
    """Realised vol and router confidence (top-1 probability) over time, daily instruments."""
    daily = pred[pred["freq"] == "D"]
    fig = _figure((11, 6))
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    for name, g in daily.groupby("instrument", sort=False):
        g = g.sort_values("date")
        ax1.plot(g["date"], g["rv_rule_pct"], lw=1, label=name)
        ax2.plot(g["date"], g["router_maxprob"].rolling(window, min_periods=1).mean(), lw=1)
    ax1.set_yscale("log")
    ax1.set_ylabel("realised vol (%/day)")
    ax1.legend(fontsize=8, ncol=4)
    ax2.set_ylabel(f"router top-1 prob\n({window}-day mean)")
    ax2.set_ylim(0, 1.02)
    ax1.set_title("Volatility and router confidence over the test years")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def performance_vs_preference(by_inst: pd.DataFrame, path: Path) -> Path:
    """Per instrument: MoE QLIKE relative to GARCH against how concentrated its routing is."""
    fig = _figure((8, 5.5))
    ax = fig.subplots()
    colors = _colors()
    rel = by_inst["qlike_moe"] - by_inst["qlike_garch"]
    for e in range(N_EXPERTS):
        sel = (by_inst["top_expert"] == e).to_numpy()
        if sel.any():
            ax.scatter(
                by_inst.loc[sel, "top_expert_share"], rel[sel], s=60, color=colors[e],
                label=_expert_label(e),
            )  # fmt: skip
    for share, r, name, cls in zip(
        by_inst["top_expert_share"], rel, by_inst["instrument"], by_inst["asset_class"], strict=True
    ):
        ax.annotate(
            f"{name} ({cls})", (share, r), fontsize=7, xytext=(4, 3), textcoords="offset points"
        )
    ax.axhline(0.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("share of the instrument's test rows sent to its most-used expert")
    ax.set_ylabel("QLIKE(MoE) - QLIKE(GARCH)   (< 0: MoE better)")
    ax.set_title("Forecast quality by instrument vs expert preference")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def make_all(pred: pd.DataFrame, by_inst: pd.DataFrame, out_dir: Path) -> dict[str, str]:
    """Write the four PNGs into ``out_dir`` and return ``{name: path}``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return {
        "routing_heatmap": str(routing_heatmap(pred, out_dir / "routing_heatmap.png")),
        "conditions_scatter": str(conditions_scatter(pred, out_dir / "conditions_scatter.png")),
        "confidence_timeseries": str(
            confidence_timeseries(pred, out_dir / "confidence_timeseries.png")
        ),
        "performance_vs_preference": str(
            performance_vs_preference(by_inst, out_dir / "performance_vs_preference.png")
        ),
    }
