"""Trade-off plots of a sweep: quality vs speed, balance vs quality, drops vs capacity.

Points are coloured by router and marked by k (drop lines: styled by expert count); the
label beside each says its expert count and capacity factor where it fits (sweep.md lists
every point). Lower quality values are better (the task's metric).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from moekit.viz.figure import save_figure
from moekit.viz.style import colors, new_figure, place_labels, styled

MARKERS = "osD^v<>p"
LINES = ("-", "--", ":", "-.")


def _cf(point: dict[str, Any]) -> str:
    cf = point["capacity_factor"]
    return "none" if cf is None else f"{cf:g}"


def _scatter(ax: Axes, records: list[dict], x: str, y: str, palette: dict, marks: dict) -> list:
    """Draws the points; returns (xy, label) pairs to place once the figure is laid out."""
    shown = [r for r in records if r.get(x) is not None and r.get(y) is not None]
    for r in shown:
        p = r["point"]
        ax.scatter(r[x], r[y], color=palette[p["router"]], marker=marks[p["k"]], s=36, zorder=3)
    ax.margins(0.12)
    return [((r[x], r[y]), f"E{r['point']['experts']} cf {_cf(r['point'])}") for r in shown]


def _drops(ax: Axes, records: list[dict], palette: dict, marks: dict, styles: dict) -> None:
    levels = sorted({r["point"]["capacity_factor"] for r in records} - {None})
    ticks = [f"{c:g}" for c in levels] + (
        ["none"] if any(r["point"]["capacity_factor"] is None for r in records) else []
    )
    lines: dict[tuple, list[tuple[int, float]]] = {}
    for r in records:
        p = r["point"]
        if r.get("dropped_fraction") is not None:
            key = (p["router"], p["k"], p["experts"])
            lines.setdefault(key, []).append((ticks.index(_cf(p)), 100 * r["dropped_fraction"]))
    for (router, k, experts), pts in lines.items():
        pts.sort()
        ax.plot(
            *zip(*pts, strict=True),
            marker=marks[k],
            color=palette[router],
            ls=styles[experts],
            lw=1,
        )
    ax.set_xticks(range(len(ticks)), ticks)
    ax.set(
        title="dropped token-slots vs capacity",
        xlabel="capacity factor (none = dropless)",
        ylabel="% of token-slots",
    )


@styled
def sweep_figure(records: list[dict[str, Any]], metric: str) -> Figure:
    """The three trade-off panels of finished sweep points; the drops panel only with drops data."""
    routers = list(dict.fromkeys(r["point"]["router"] for r in records))
    ks = list(dict.fromkeys(r["point"]["k"] for r in records))
    palette = colors(routers)
    marks = {k: MARKERS[i % len(MARKERS)] for i, k in enumerate(ks)}
    experts = list(dict.fromkeys(r["point"]["experts"] for r in records))
    styles = {e: LINES[i % len(LINES)] for i, e in enumerate(experts)}
    has_drops = any(r.get("dropped_fraction") is not None for r in records)
    fig, axes = new_figure(
        1, 3 if has_drops else 2, panel=(4.8, 3.8), title=f"sweep: {len(records)} points"
    )
    speed = _scatter(axes[0, 0], records, "tokens_per_s", "quality", palette, marks)
    axes[0, 0].set(
        title="quality vs throughput",
        xlabel="training tokens/s",
        ylabel=f"{metric} (lower is better)",
    )
    balance = _scatter(axes[0, 1], records, "load_imbalance", "quality", palette, marks)
    axes[0, 1].set(
        title="load balance vs quality",
        xlabel="busiest expert's load / uniform share",
        ylabel=f"{metric} (lower is better)",
    )
    if has_drops:
        _drops(axes[0, 2], records, palette, marks, styles)
    handles = [
        Line2D([], [], color=palette[r], lw=0, marker="o", label=f"router {r}") for r in routers
    ]
    handles += [Line2D([], [], color="grey", lw=0, marker=marks[k], label=f"k={k}") for k in ks]
    if has_drops:
        handles += [Line2D([], [], color="grey", ls=styles[e], label=f"E={e}") for e in experts]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(6, len(handles)))
    for ax, labels in ((axes[0, 0], speed), (axes[0, 1], balance)):  # last: the layout is final
        place_labels(ax, [xy for xy, _ in labels], [text for _, text in labels])
    return fig


def plot_sweep(records: list[dict[str, Any]], path: str | Path, metric: str) -> Path:
    """Writes `sweep_figure` as a PNG; returns its path."""
    return save_figure(sweep_figure(records, metric), path)
