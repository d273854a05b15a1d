"""Routing pictures: which experts each input category is sent to, per MoE layer, and how
evenly each layer of a model spreads its tokens over its experts."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from moekit.viz.figure import save_figure
from moekit.viz.style import (
    HEATMAP,
    colorbar,
    grid_cols,
    hide_unused,
    new_figure,
    styled,
    text_inches,
)


def category_shares(counts: list[list[float]]) -> np.ndarray:
    """[C, E] counts -> each category's share of its token-slots per expert (rows sum to 1)."""
    c = np.asarray(counts, dtype=float)
    return c / np.maximum(c.sum(1, keepdims=True), 1.0)


@styled
def specialisation_figure(
    routing: dict[str, list[list[float]]], categories: list[str], title: str = ""
) -> Figure:
    """Heatmap per layer on a grid: rows = input categories, columns = experts, colour = share,
    one colour scale and one colour bar for every layer."""
    layers = sorted(routing, key=int)
    E = len(next(iter(routing.values()))[0]) if routing else 1
    label_w = max((text_inches(c, 8)[0] for c in categories), default=0.0)
    panel = (1.2 + label_w + 0.42 * E, 0.9 + 0.32 * len(categories))
    cols = grid_cols(len(layers), most=max(1, min(3, int(17 // panel[0]))))  # <= 17 in wide
    rows = -(-max(1, len(layers)) // cols)
    fig, axes = new_figure(
        rows,
        cols,
        panel=panel,
        title=title or ("routing specialisation: share of each category's tokens per expert"),
    )
    shares = {layer: category_shares(routing[layer]) for layer in layers}
    top = max([0.5, *(float(share.max()) for share in shares.values())])
    im = None
    for ax, layer in zip(axes.flat, layers, strict=False):
        share = shares[layer]
        im = ax.imshow(share, cmap=HEATMAP, vmin=0, vmax=top)
        ax.set_xticks(range(share.shape[1]))
        ax.set_yticks(range(len(categories)), categories)
        ax.set(title=f"layer {layer}", xlabel="expert")
        ax.grid(False)
        for (i, j), v in np.ndenumerate(share):
            if v >= 0.2:
                colour = "black" if v > 0.6 * top else "white"
                ax.text(j, i, f"{v:.0%}", ha="center", va="center", fontsize=6, color=colour)
    hide_unused(axes, len(layers))
    if im is not None:
        colorbar(fig, im, list(axes.flat[: len(layers)]), "share of the category's token-slots")
    return fig


def plot_specialisation(
    routing: dict[str, list[list[float]]],
    categories: list[str],
    path: str | Path,
    title: str = "",
) -> Path:
    """Writes `specialisation_figure` as a PNG; returns its path."""
    return save_figure(specialisation_figure(routing, categories, title), path)


CELL_VALUE_SIZE = 6.5  # points, of the numbers written in heatmap cells


def tick_step(n: int, room: float, label: float) -> int:
    """Every how many of `n` ticks to label so labels `label` inches wide fit `room` inches:
    1, 2, 5, 10, 20, 50, ..."""
    step = 1
    while n / step * label > room:
        step = step * 5 // 2 if str(step).startswith("2") else step * 2
    return step


def layer_name(name: str) -> str:
    """A router's module path shortened to its layer: "model.layers.3.mlp.gate" -> "layer 3"."""
    found = re.search(r"\.(\d+)\.", f".{name}.")
    return f"layer {found.group(1)}" if found else name


@styled
def expert_load_figure(
    names: Sequence[str], loads: Sequence[Sequence[float]], title: str = ""
) -> Figure:
    """Heatmap MoE layer x expert of each expert's load over the uniform share (1 = even),
    sized to the grid; every expert ticked (every nth when many), values in cells that hold them."""
    E = max(len(row) for row in loads)
    ratio = np.full((len(loads), E), np.nan)
    for i, row in enumerate(loads):
        ratio[i, : len(row)] = np.asarray(row, dtype=float) * len(row)
    L = len(loads)
    cell_w, cell_h = min(0.55, 11.0 / E), min(0.42, 9.0 / L)
    labels = [layer_name(n) for n in names]
    labels = labels if len(set(labels)) == len(labels) else list(names)  # two in one layer
    label_w = max(text_inches(t, 8)[0] for t in labels)
    fig, axes = new_figure(
        1, 1, panel=(1.6 + label_w + cell_w * E, 1.5 + cell_h * L),
        title=title or "expert load / uniform share (1 = even)",
    )  # fmt: skip
    ax = axes[0, 0]
    top = max(2.0, float(np.nanmax(ratio)))
    im = ax.imshow(ratio, aspect="auto", cmap=HEATMAP, interpolation="nearest", vmin=0, vmax=top)
    step = tick_step(E, cell_w * E, text_inches(str(E - 1), 8)[0] + 0.08)
    ax.set_xticks(range(0, E, step))
    rows = tick_step(L, cell_h * L, 0.16)
    ax.set_yticks(range(0, L, rows), labels[::rows])
    ax.set(xlabel="expert", ylabel="MoE layer")
    ax.grid(False)
    text_w, text_h = text_inches("0.00", CELL_VALUE_SIZE)
    if cell_w >= text_w + 0.04 and cell_h >= text_h:
        for (i, j), v in np.ndenumerate(ratio):
            if not math.isnan(v):
                colour = "black" if v > 0.6 * top else "white"
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=CELL_VALUE_SIZE,
                        color=colour)  # fmt: skip
    colorbar(fig, im, ax, "load / uniform share")
    return fig


def plot_expert_load(
    names: Sequence[str], loads: Sequence[Sequence[float]], path: str | Path, title: str = ""
) -> Path:
    """Writes `expert_load_figure` as a PNG; returns its path."""
    return save_figure(expert_load_figure(names, loads, title), path)
