"""One look for every PNG moekit writes: fonts, colours, grids, labelled colour bars.

Plotting functions are decorated with `@styled` (the style holds while they create artists)
and build figures with `new_figure`, which never touches pyplot's global figure registry.
`panel_titles` lists a figure's panels, which `save_figure` also stores in the PNG, so a test
can check a written file's panels without parsing pixels.
"""

from __future__ import annotations

import functools
import textwrap
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colorbar import Colorbar
from matplotlib.figure import Figure, SubFigure
from matplotlib.font_manager import FontProperties
from matplotlib.text import Text
from matplotlib.transforms import Bbox

F = TypeVar("F", bound=Callable[..., Any])

STYLE: dict[str, Any] = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.titleweight": "bold",
    "axes.labelsize": 9,
    "axes.grid": True,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "legend.fontsize": 8,
    "legend.frameon": False,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "lines.linewidth": 1.4,
    "figure.titlesize": 11,
    "figure.dpi": 110,
    "image.cmap": "viridis",
}
FIGURE_WIDTH_PANELS = 4.6  # inches of one panel's width in a grid
PALETTE = tuple(matplotlib.colormaps["tab10"](i) for i in range(10))
HEATMAP = "viridis"  # sequential maps for every heatmap: shares, loads, counts


def styled(fn: F) -> F:
    """Run a plotting function with the moekit style in force (rcParams are restored after)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with matplotlib.rc_context(STYLE):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def new_figure(
    rows: int = 1,
    cols: int = 1,
    panel: tuple[float, float] = (4.6, 3.3),
    title: str = "",
    layout: str | None = "constrained",
    **grid: Any,
) -> tuple[Figure, np.ndarray]:
    """A figure of rows x cols panels of about `panel` inches each; axes [rows, cols].

    `layout="none"` leaves placement to `fig.subplots_adjust` (3D panels need it).
    """
    size = (panel[0] * cols, panel[1] * rows + (0.4 if title else 0))
    fig = Figure(figsize=size, layout=layout)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False, **grid)
    if title:
        fig.suptitle(title)
    return fig, axes


def colors(names: Iterable[str]) -> dict[str, Any]:
    """A stable colour per name, in order, cycling through the palette."""
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}


def grid_cols(n: int, most: int = 3) -> int:
    """Columns for n panels: all in one row up to `most`, else the count from 2 to `most`
    that leaves the fewest cells empty (the wider on a tie)."""
    if n <= most or most < 2:
        return max(1, min(n, most))
    return min(range(2, most + 1), key=lambda c: (-n % c, -c))


def colorbar(
    fig: Figure | SubFigure, mappable: Any, ax: Axes | Sequence[Axes], label: str
) -> Colorbar:
    """A colour bar beside `ax`; the label is required so no colour goes unexplained."""
    if not label:
        raise ValueError("label must say what the colour means")
    bar = fig.colorbar(mappable, ax=ax, fraction=0.05, pad=0.02)
    bar.set_label(label)
    return bar


def figure_legend(fig: Figure, ax: Axes, ncol: int = 4) -> None:
    """The legend of `ax`'s lines once for the whole figure, below the panels (never on data)."""
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(ncol, max(1, len(labels))))


def category_boxes(
    ax: Axes, values: Sequence[np.ndarray], names: Sequence[str], palette: dict[str, Any]
) -> None:
    """Horizontal box plots, one per category, top to bottom in `names` order."""
    style = {"patch_artist": True, "medianprops": {"color": "black"}}
    try:
        box = ax.boxplot(list(values), orientation="horizontal", **style)
    except TypeError:  # matplotlib < 3.10 names it vert
        box = ax.boxplot(list(values), vert=False, **style)
    for patch, name in zip(box["boxes"], names, strict=True):
        patch.set_facecolor(palette[name])
        patch.set_alpha(0.6)
    ax.set_yticks(range(1, len(names) + 1), names)
    ax.invert_yaxis()


# offsets in points (dx, dy) and alignment of a label beside its point, tried in order
_SPOTS = (
    (4, 2, "left"),
    (4, -8, "left"),
    (-4, 2, "right"),
    (-4, -8, "right"),
    (0, 6, "center"),
    (0, -13, "center"),
)


def place_labels(
    ax: Axes, xy: Sequence[tuple[float, float]], texts: Sequence[str], size: float = 6.5
) -> int:
    """Label points without overlap: each label takes the first free spot beside its point
    (inside the panel, off other labels and points); a label with no free spot is left out
    (the table beside the plot holds every value). Returns how many were left out."""
    fig = ax.get_figure()
    fig.draw_without_rendering()  # settle the layout so positions are final
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    pts = [ax.transData.transform(p) for p in xy]
    taken = [Bbox.from_extents(x - 3, y - 3, x + 3, y + 3) for x, y in pts]
    if ax.get_legend() is not None:  # a legend drawn before the labels keeps its place
        taken.append(ax.get_legend().get_window_extent(renderer))
    missing = 0
    for (x, y), text in zip(xy, texts, strict=True):
        for dx, dy, align in _SPOTS:
            label = ax.annotate(
                text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=size,
                ha=align, color="dimgrey",
            )  # fmt: skip
            box = label.get_window_extent(renderer)
            inside = frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1)
            if inside and not any(box.overlaps(other) for other in taken):
                taken.append(box)
                break
            label.remove()
        else:
            missing += 1
    return missing


def hide_unused(axes: np.ndarray, used: int) -> None:
    """Remove the grid cells after the first `used` panels (row-major)."""
    for ax in axes.flat[used:]:
        ax.remove()


def panel_titles(fig: Figure) -> list[str]:
    """Titles of the figure's panels, in creation order (colour bars have none)."""
    return [ax.get_title() for ax in fig.axes if ax.get_title()]


def _tick_labels(axis: Any) -> list[Text]:
    """Labels of the major ticks inside the view (the others are not drawn)."""
    lo, hi = sorted(axis.get_view_interval())
    eps = 1e-9 * max(1.0, abs(hi - lo))
    locs = axis.get_majorticklocs()
    ticks = axis.get_major_ticks(len(locs))
    return [t.label1 for t, loc in zip(ticks, locs, strict=False) if lo - eps <= loc <= hi + eps]


def _figure_texts(fig: Figure | SubFigure) -> list[Text]:
    """Titles, notes and legend texts of a figure and of its subfigures."""
    texts = [*fig.texts, *[t for legend in fig.legends for t in legend.get_texts()]]
    for sub in fig.subfigs:
        texts += _figure_texts(sub)
    return texts


def drawn_texts(fig: Figure) -> list[Text]:
    """Texts a reader sees: figure titles and legends, and per panel its titles, axis labels,
    tick labels in view, notes and legend (3D panels: titles only)."""
    texts = _figure_texts(fig)
    for ax in fig.axes:
        texts.append(ax.title)
        if ax.name == "3d":
            continue
        texts += [ax.xaxis.label, ax.yaxis.label, *ax.texts]
        texts += _tick_labels(ax.xaxis) + _tick_labels(ax.yaxis)
        if ax.get_legend() is not None:
            texts += ax.get_legend().get_texts()
    unique = {id(t): t for t in texts}  # the suptitle is also among fig.texts
    return [t for t in unique.values() if t.get_visible() and t.get_text().strip()]


def text_overlaps(fig: Figure) -> list[tuple[str, str]]:
    """Pairs of drawn texts (titles, labels, tick labels, legends, notes) whose boxes overlap."""
    renderer = fig.canvas.get_renderer()
    fig.draw_without_rendering()
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in drawn_texts(fig)]
    out = []
    for i, (a, box_a) in enumerate(boxes):
        for b, box_b in boxes[i + 1 :]:
            if box_a.width and box_b.width and box_a.overlaps(box_b):
                out.append((a, b))
    return out


def clipped_texts(fig: Figure) -> list[str]:
    """Drawn texts that reach past the figure's edge, i.e. that the saved PNG cuts off."""
    renderer = fig.canvas.get_renderer()
    fig.draw_without_rendering()
    frame = fig.bbox.padded(1.0)  # a pixel of rounding
    out = []
    for t in drawn_texts(fig):
        box = t.get_window_extent(renderer)
        if not (frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1)):
            out.append(t.get_text())
    return out


def wrap(label: object, width: int = 18) -> str:
    """A label broken at spaces into lines of about `width` characters (long words stay whole)."""
    return textwrap.fill(str(label), width, break_long_words=False, break_on_hyphens=False)


_MEASURE = FigureCanvasAgg(Figure(dpi=72)).get_renderer()  # one point = one pixel


def text_inches(text: str, size: float) -> tuple[float, float]:
    """Width and height in inches of `text` (lines split at newlines) set at `size` points."""
    prop = FontProperties(size=size)
    lines = str(text).split("\n")
    width = max(_MEASURE.get_text_width_height_descent(s, prop, ismath=False)[0] for s in lines)
    return width / 72, len(lines) * size * 1.25 / 72
