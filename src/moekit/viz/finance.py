"""The finance demo's figures, in moekit's plot style (`moekit.viz.style`), rendered off-screen.

Four from one seed's predictions (routing over time, conditions by expert, router confidence,
quality vs routing concentration) and one over all seeds (each method's QLIKE with its
confidence interval per asset class, and Diebold-Mariano tests of MoE against GARCH).
Labels beside points are placed where they overlap nothing, or left out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from moekit.tasks.finance.data import ASSET_CLASSES
from moekit.viz.figure import save_figure
from moekit.viz.style import HEATMAP, colorbar, colors, new_figure, place_labels, styled

N_EXPERTS = len(ASSET_CLASSES)
EXPERT_COLORS = colors(str(e) for e in range(N_EXPERTS))


def _expert_label(e: int) -> str:
    return f"expert {e} (prior: {ASSET_CLASSES[e]})"


@styled
def routing_heatmap_figure(pred: pd.DataFrame) -> Figure:
    """Instrument x expert over time: share of each month's rows routed to each expert."""
    names = list(dict.fromkeys(pred["instrument"]))
    months = pd.PeriodIndex(pd.DatetimeIndex(pred["date"]), freq="M")
    all_months = pd.period_range(months.min(), months.max(), freq="M")
    fig, axes = new_figure(
        len(names), 1, panel=(11, 1.05), sharex=True,
        title="Learned router: share of each test month's rows sent to each expert",
    )  # fmt: skip
    im = None
    for ax, name in zip(axes[:, 0], names, strict=True):
        sel = (pred["instrument"] == name).to_numpy()
        share = pd.crosstab(months[sel], pred["expert"].to_numpy()[sel], normalize="index")
        share = share.reindex(index=all_months, columns=range(N_EXPERTS))
        im = ax.imshow(
            share.to_numpy(float).T,
            aspect="auto",
            vmin=0,
            vmax=1,
            cmap=HEATMAP,
            interpolation="none",
        )
        cls = pred.loc[sel, "asset_class"].iloc[0]
        ax.set_title(f"{name} ({cls})", fontsize=8)
        ax.set_yticks([0, N_EXPERTS - 1], ["0", str(N_EXPERTS - 1)])
        ax.set_ylabel("expert", fontsize=7)
        ax.grid(False)
    ticks = np.arange(0, len(all_months), max(1, len(all_months) // 12))
    axes[-1, 0].set_xticks(ticks, [str(all_months[i]) for i in ticks], rotation=45, ha="right")
    colorbar(fig, im, axes[:, 0].tolist(), "share of the month's rows routed to the expert")
    return fig


@styled
def conditions_scatter_figure(pred: pd.DataFrame) -> Figure:
    """Market conditions (daily vol vs return) coloured by the chosen expert."""
    fig, axes = new_figure(1, 1, panel=(8, 5.5))
    ax = axes[0, 0]
    for e in range(N_EXPERTS):
        g = pred[pred["expert"] == e]
        if len(g):
            ax.scatter(
                g["rv_rule_pct"], 100 * g["ret"], s=6, alpha=0.5, color=EXPERT_COLORS[str(e)],
                label=_expert_label(e),
            )  # fmt: skip
    ax.set_xscale("log")
    ax.set(
        title="Market conditions of test rows, coloured by top-1 expert",
        xlabel="realised volatility, daily scale (%, log axis)",
        ylabel="return, daily scale (%)",
    )
    ax.legend(markerscale=2, loc="upper left")
    return fig


@styled
def confidence_timeseries_figure(pred: pd.DataFrame, window: int = 10) -> Figure:
    """Realised vol and router confidence (top-1 probability) over time, daily instruments."""
    daily = pred[pred["freq"] == "D"]
    fig, axes = new_figure(2, 1, panel=(11, 2.8), sharex=True)
    ax1, ax2 = axes[:, 0]
    for name, g in daily.groupby("instrument", sort=False):
        g = g.sort_values("date")
        ax1.plot(g["date"], g["rv_rule_pct"], lw=1, label=name)
        ax2.plot(g["date"], g["router_maxprob"].rolling(window, min_periods=1).mean(), lw=1)
    ax1.set_yscale("log")
    ax1.set(title="realised volatility of daily instruments", ylabel="realised vol (%/day)")
    ax2.set(title=f"router confidence ({window}-day mean)", ylabel="top-1 probability")
    ax2.set_ylim(0, 1.02)
    fig.legend(*ax1.get_legend_handles_labels(), loc="outside lower center", ncol=6)
    return fig


@styled
def performance_vs_preference_figure(by_inst: pd.DataFrame) -> Figure:
    """Per instrument: MoE QLIKE relative to GARCH against how concentrated its routing is."""
    fig, axes = new_figure(1, 1, panel=(8, 5.5))
    ax = axes[0, 0]
    rel = (by_inst["qlike_moe"] - by_inst["qlike_garch"]).to_numpy()
    share = by_inst["top_expert_share"].to_numpy()
    for e in range(N_EXPERTS):
        sel = (by_inst["top_expert"] == e).to_numpy()
        if sel.any():
            ax.scatter(
                share[sel], rel[sel], s=60, color=EXPERT_COLORS[str(e)], label=_expert_label(e)
            )
    ax.axhline(0.0, color="grey", lw=0.8, ls="--")
    ax.set(
        title="Forecast quality by instrument vs expert preference",
        xlabel="share of the instrument's test rows sent to its most-used expert",
        ylabel="QLIKE(MoE) - QLIKE(GARCH)   (< 0: MoE better)",
    )
    ax.margins(0.15)
    ax.legend(loc="best")
    names = [
        f"{n} ({c})" for n, c in zip(by_inst["instrument"], by_inst["asset_class"], strict=True)
    ]
    place_labels(ax, list(zip(share, rel, strict=True)), names, size=7)
    return fig


def seeds_title(n_seeds: int) -> str:
    return f"Over {n_seeds} training seeds" if n_seeds != 1 else "One training seed"


@styled
def seeds_figure(summary: pd.DataFrame, dm: pd.DataFrame, n_seeds: int) -> Figure:
    """QLIKE per asset class and method (mean over seeds, with its 95% CI from two seeds on)
    and the DM statistics."""
    fig, axes = new_figure(1, 2, panel=(6.2, 4.4), title=seeds_title(n_seeds))
    ax = axes[0, 0]
    classes = list(dict.fromkeys(summary["asset_class"]))
    methods = list(dict.fromkeys(summary["method"]))
    palette = colors(methods)
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        rows = summary[summary["method"] == m].set_index("asset_class").reindex(classes)
        pos = np.arange(len(classes)) + (i - (len(methods) - 1) / 2) * width
        mean = rows["mean"].to_numpy()
        err = None
        if n_seeds > 1:  # one seed has no interval: no whiskers that look like one
            low = np.clip(rows["low"].to_numpy(), mean / 10, None)  # a log axis shows no CI below 0
            err = np.vstack([mean - low, rows["high"].to_numpy() - mean])
            err = np.where(np.isfinite(err), err, 0.0)
        ax.bar(pos, mean, width, yerr=err, capsize=2, color=palette[m], label=m)
    ax.set_yscale("log")
    ax.set_xticks(range(len(classes)), classes, rotation=25, ha="right")
    ax.grid(axis="x", visible=False)
    spread = "mean, 95% CI over seeds" if n_seeds > 1 else "one seed"
    ax.set(title="QLIKE by asset class", ylabel=f"QLIKE (log; {spread})")
    ax.legend()
    ax = axes[0, 1]
    if len(dm):
        y = np.arange(len(dm))
        better = palette.get("MoE", "tab:blue")
        shade = [better if s < 0 else "grey" for s in dm["stat"]]
        ax.barh(y, dm["stat"], color=shade)
        ax.set_yticks(
            y, [f"{g} (p={p:.2f})" for g, p in zip(dm["group"], dm["p_value"], strict=True)]
        )
        ax.invert_yaxis()
        for x in (-1.96, 1.96):
            ax.axvline(x, color="grey", lw=0.8, ls="--")
    ax.grid(axis="y", visible=False)
    ax.set(
        title="Diebold-Mariano: MoE vs GARCH (QLIKE)",
        xlabel="DM statistic (< 0, coloured: MoE better; dashed: 5% level)",
    )
    return fig


def make_all(
    pred: pd.DataFrame,
    by_inst: pd.DataFrame,
    out_dir: Path,
    seeds: tuple[pd.DataFrame, pd.DataFrame, int] | None = None,
) -> dict[str, str]:
    """Write the PNGs into ``out_dir`` (the seeds figure when `seeds` is given).

    Returns ``{name: path}``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Any] = {
        "routing_heatmap": routing_heatmap_figure(pred),
        "conditions_scatter": conditions_scatter_figure(pred),
        "confidence_timeseries": confidence_timeseries_figure(pred),
        "performance_vs_preference": performance_vs_preference_figure(by_inst),
    }
    if seeds is not None:
        figures["seeds"] = seeds_figure(*seeds)
    return {name: str(save_figure(fig, out_dir / f"{name}.png")) for name, fig in figures.items()}
