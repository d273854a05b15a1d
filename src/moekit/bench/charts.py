"""The charts of benchmark reports: a declarative `Chart` drawn as one PNG in the viz style.

A benchmark may describe its own chart (lines with a spread band and a floor, bars with
whiskers, `grouped_bars`: a group per shape, a bar per contender); otherwise `auto_chart`
draws one from the report's `rows`: each varying metric against the first numeric column
every row label repeats over (concurrency, size, T, threshold), one line per label, or as
bars per row label when there is none. Percentile
dicts ({"p50": .., "p99": ..}) draw as the median with a band. Bar labels stay level, wrapped
at spaces, and the panels grow to hold them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from moekit.viz.figure import save_figure
from moekit.viz.style import (
    STYLE,
    colors,
    figure_legend,
    hide_unused,
    new_figure,
    styled,
    text_inches,
    wrap,
)

MAX_PANELS = 8
COLS = 4


@dataclass
class Series:
    """One line (x numeric) or one bar group (x labels); lo/hi bound a spread, e.g. min-max."""

    label: str
    x: Sequence[Any]
    y: Sequence[float]
    lo: Sequence[float] | None = None
    hi: Sequence[float] | None = None

    def __post_init__(self) -> None:
        for name in ("x", "lo", "hi"):
            value = getattr(self, name)
            if value is not None and len(value) != len(self.y):
                raise ValueError(
                    f"series {self.label!r}: {name} has {len(value)} values for {len(self.y)} y"
                )


@dataclass
class Panel:
    """kind "line": series over numeric x; "bar" / "barh": one bar per series at each x label."""

    title: str
    series: list[Series]
    xlabel: str = ""
    ylabel: str = ""
    kind: str = "line"
    logx: bool = False
    logy: bool = False
    floor: Series | None = None  # drawn as a dashed black line: what no method can beat
    note: str = ""  # a few words under the value axis label, e.g. what the band spans

    def __post_init__(self) -> None:
        if self.kind not in ("line", "bar", "barh"):
            raise ValueError(f"panel {self.title!r}: kind={self.kind!r} must be line, bar or barh")


@dataclass
class Chart:
    title: str
    panels: list[Panel] = field(default_factory=list)
    cols: int = COLS
    panel_size: tuple[float, float] = (4.4, 3.4)  # inches per panel


def _line(ax: Axes, panel: Panel, palette: dict[str, Any]) -> None:
    for s in panel.series:
        ax.plot(s.x, s.y, "o-", ms=3, color=palette[s.label], label=s.label)
        if s.lo is not None and s.hi is not None:
            ax.fill_between(s.x, s.lo, s.hi, color=palette[s.label], alpha=0.18, lw=0)
    if panel.floor is not None:
        ax.plot(panel.floor.x, panel.floor.y, "--", color="black", lw=1.2, label=panel.floor.label)
    if panel.logx:
        xs = sorted({v for s in panel.series for v in s.x})
        ax.set_xscale("log")
        if len(xs) <= 8:  # few measured sizes: tick exactly those, written plainly
            ax.set_xticks(xs, [f"{v:,g}" for v in xs])
            ax.minorticks_off()
    if panel.logy:
        ax.set_yscale("log")


def _bar(ax: Axes, panel: Panel, palette: dict[str, Any]) -> None:
    labels = _bar_labels(panel)
    width = 0.8 / max(1, len(panel.series))
    horizontal = panel.kind == "barh"
    for i, s in enumerate(panel.series):
        pos = [labels.index(x) + (i - (len(panel.series) - 1) / 2) * width for x in s.x]
        err = None
        if s.lo is not None and s.hi is not None:
            err = [[y - lo for y, lo in zip(s.y, s.lo, strict=True)],
                   [hi - y for y, hi in zip(s.y, s.hi, strict=True)]]  # fmt: skip
        # one series: a colour per bar, the same as that name's line elsewhere in the chart
        colour = [palette[x] for x in s.x] if len(panel.series) == 1 else palette[s.label]
        if horizontal:
            ax.barh(pos, s.y, width, xerr=err, capsize=3, color=colour, label=s.label)
        else:
            ax.bar(pos, s.y, width, yerr=err, capsize=3, color=colour, label=s.label)
    shown = [wrap(x) for x in labels]  # level and whole: never rotated, never cut
    if horizontal:
        ax.set_yticks(range(len(labels)), shown)
        ax.invert_yaxis()
        ax.grid(axis="y", visible=False)
    else:
        ax.set_xticks(range(len(labels)), shown)
        ax.grid(axis="x", visible=False)
    if panel.logy:
        ax.set_yscale("log")


def _bar_labels(panel: Panel) -> list[Any]:
    return list(dict.fromkeys(x for s in panel.series for x in s.x))


def _panel_inches(chart: Chart) -> tuple[float, float]:
    """The chart's panel size grown to fit its bar labels: a slot per label as wide as the
    label (vertical bars), or the panel widened by the widest label (horizontal bars)."""
    w, h = chart.panel_size
    tick = STYLE["xtick.labelsize"]
    for panel in chart.panels:
        if panel.kind == "line":
            continue
        labels = _bar_labels(panel)
        sizes = [text_inches(wrap(x), tick) for x in labels] or [(0.0, 0.0)]
        widest, tallest = max(s[0] for s in sizes), max(s[1] for s in sizes)
        if panel.kind == "bar":
            slot = max(widest + 0.15, 0.22 * len(panel.series) + 0.1)
            w = max(w, len(labels) * slot + 1.0)
            h = max(h, 2.6 + tallest)
        else:
            w = max(w, 2.8 + widest)
            h = max(h, 1.0 + len(labels) * max(tallest + 0.08, 0.16 * len(panel.series) + 0.1))
    return w, h


def _shared_series(chart: Chart) -> list[str]:
    """The series names when every panel draws the same two or more (one legend serves all)."""
    names = [[s.label for s in p.series] for p in chart.panels]
    if (
        len(names[0]) > 1
        and all(n == names[0] for n in names)
        and all(p.floor is None for p in chart.panels)
    ):
        return names[0]
    return []


@styled
def chart_figure(chart: Chart) -> Figure:
    """The chart's panels on a grid, sized to their labels, with one legend for the figure
    when every panel draws the same series, else one per panel; returns the Figure."""
    n = len(chart.panels)
    cols = min(chart.cols, n)
    fig, axes = new_figure(-(-n // cols), cols, panel=_panel_inches(chart), title=chart.title)
    names = [s.label for p in chart.panels for s in p.series]
    names += [
        x for p in chart.panels if p.kind != "line" and len(p.series) == 1 for x in p.series[0].x
    ]
    palette = colors(dict.fromkeys(names))
    shared = _shared_series(chart)
    for ax, panel in zip(axes.flat, chart.panels, strict=False):
        (_line if panel.kind == "line" else _bar)(ax, panel, palette)
        ax.set_title(panel.title)
        value_label = f"{panel.ylabel}\n({panel.note})" if panel.note else panel.ylabel
        if panel.kind == "barh":  # the values run along x
            ax.set(xlabel=value_label, ylabel=panel.xlabel)
        else:
            ax.set(xlabel=panel.xlabel, ylabel=value_label)
        if not shared and (len(panel.series) > 1 or panel.floor is not None):
            ax.legend(fontsize=7)
    if shared:
        figure_legend(fig, axes.flat[0], ncol=min(4, len(shared)))
    hide_unused(axes, n)
    return fig


def draw_chart(chart: Chart, path: str | Path) -> tuple[Path, list[str]]:
    """Writes the chart as a PNG; returns its path and panel titles."""
    fig = chart_figure(chart)
    titles = [p.title for p in chart.panels]
    return save_figure(fig, path), titles


# automatic charts from rows ----------------------------------------------------------------
def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _percentiles(v: Any) -> bool:
    return isinstance(v, dict) and "p50" in v and all(_number(x) for x in v.values())


def _spread(d: dict[str, float]) -> tuple[float, float, float]:
    """(median, lowest, highest) of a percentile dict."""
    return d["p50"], min(d.values()), max(d.values())


def _label(row: dict[str, Any], keys: list[str]) -> str:
    return " ".join(str(row[k]) for k in keys) or "all"


def _metrics(rows: list[dict[str, Any]], skip: set[str]) -> list[str]:
    """Keys that are numbers (or percentile dicts) in every row and vary between rows."""
    out = []
    for key in rows[0]:
        if key in skip:
            continue
        values = [r.get(key) for r in rows]
        varying = all(_number(v) for v in values) and len(set(values)) > 1
        if varying or all(_percentiles(v) for v in values):
            out.append(key)
    return out[:MAX_PANELS]


UNITS = (("tok_s", "tokens/s"), ("per_s", "per second"), ("_ms", "ms"), ("_s", "s"),
         ("_gib", "GiB"), ("_mib", "MiB"), ("percent", "%"))  # fmt: skip


def unit_of(key: str) -> str:
    """The unit a row key's name ends in ("ttft_s" -> "s", "fwd_tok_s" -> "tokens/s"), or ""."""
    return next((unit for end, unit in UNITS if key.endswith(end)), "")


def _positive_span(values: list[float]) -> float:
    pos = [v for v in values if v > 0]
    return max(pos) / min(pos) if len(pos) == len(values) and pos else 1.0


def _is_axis(rows: list[dict[str, Any]], key: str, groups: list[str]) -> bool:
    """A column to draw against: numbers that vary, seen 2+ times in every row label, once each."""
    values = [r.get(key) for r in rows]
    if not all(_number(v) for v in values) or len(set(values)) < 2:
        return False
    pairs = [(_label(r, groups), r[key]) for r in rows]
    per_label: dict[str, int] = {}
    for label, _ in pairs:
        per_label[label] = per_label.get(label, 0) + 1
    return len(set(pairs)) == len(pairs) and min(per_label.values()) >= 2


def auto_chart(results: dict[str, Any], title: str) -> Chart | None:
    """A chart of results["rows"] (a list of dicts); None when there is nothing to draw."""
    rows = results.get("rows")
    if not isinstance(rows, list) or len(rows) < 2 or not all(isinstance(r, dict) for r in rows):
        return None
    groups = [k for k in rows[0] if all(isinstance(r.get(k), str) for r in rows)]
    groups = [k for k in groups if len({r[k] for r in rows}) > 1]
    x = next((k for k in rows[0] if _is_axis(rows, k, groups)), None)
    metrics = _metrics(rows, {x} if x else set())
    if not metrics:
        return None
    panels = []
    for key in metrics:
        spread = isinstance(rows[0][key], dict)
        series: dict[str, Series] = {}
        for r in rows:
            label = _label(r, groups)
            name = label if x else key.replace("_", " ")
            s = series.setdefault(name, Series(name, [], [], [], []))
            med, lo, hi = _spread(r[key]) if spread else (r[key], r[key], r[key])
            s.x.append(r[x] if x else label)  # type: ignore[attr-defined]
            s.y.append(med)  # type: ignore[attr-defined]
            s.lo.append(lo)  # type: ignore[union-attr]
            s.hi.append(hi)  # type: ignore[union-attr]
        if not spread:
            for s in series.values():
                s.lo = s.hi = None
        values = [v for s in series.values() for v in s.y]
        panels.append(
            Panel(
                title=key.replace("_", " "),
                series=list(series.values()),
                xlabel=x.replace("_", " ") if x else "",
                ylabel=unit_of(key),
                kind="line" if x else "bar",
                logx=bool(x) and _positive_span([r[x] for r in rows]) >= 8,
                logy=_positive_span(values) >= 20,
                note="median; band: lowest to highest percentile" if spread else "",
            )
        )
    return Chart(title, panels)


def grouped_bars(
    title: str,
    rows: list[dict[str, Any]],
    group: str,
    series: str,
    metrics: Sequence[tuple[str, str, str]],
) -> Chart | None:
    """One bar panel per metric (row key, panel title, unit): a group of bars per value of
    `group` along x, in each a bar per value of `series`, named by the figure's legend.
    A metric spanning 20x or more is drawn on a log axis. None without rows."""
    if not rows:
        return None
    names = list(dict.fromkeys(str(r[series]) for r in rows))
    panels = []
    for key, name, unit in metrics:
        lines = []
        for label in names:
            mine = [r for r in rows if str(r[series]) == label and _number(r.get(key))]
            lines.append(Series(label, [str(r[group]) for r in mine], [r[key] for r in mine]))
        values = [v for s in lines for v in s.y]
        lines = [s for s in lines if s.y]
        if lines:
            only = lines[0].label if len(names) == 1 else ""  # no legend: the axis names it
            logy = _positive_span(values) >= 20
            panels.append(Panel(name, lines, only, unit, kind="bar", logy=logy))
    return Chart(title, panels) if panels else None
