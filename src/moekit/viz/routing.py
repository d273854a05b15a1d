"""Routing specialisation: which experts each input category is sent to, per MoE layer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from moekit.viz.figure import save_figure
from moekit.viz.style import HEATMAP, colorbar, new_figure, styled


def category_shares(counts: list[list[float]]) -> np.ndarray:
    """[C, E] counts -> each category's share of its token-slots per expert (rows sum to 1)."""
    c = np.asarray(counts, dtype=float)
    return c / np.maximum(c.sum(1, keepdims=True), 1.0)


@styled
def specialisation_figure(
    routing: dict[str, list[list[float]]], categories: list[str], title: str = ""
) -> Figure:
    """Heatmap per layer: rows = input categories, columns = experts, colour = share."""
    layers = sorted(routing, key=int)
    E = len(next(iter(routing.values()))[0]) if routing else 1
    panel = (1.6 + 0.42 * E, 0.9 + 0.32 * len(categories))
    fig, axes = new_figure(
        1,
        max(1, len(layers)),
        panel=panel,
        title=title or ("routing specialisation: share of each category's tokens per expert"),
    )
    for ax, layer in zip(axes.flat, layers, strict=False):
        share = category_shares(routing[layer])
        im = ax.imshow(share, cmap=HEATMAP, vmin=0, vmax=max(0.5, float(share.max())))
        ax.set_xticks(range(share.shape[1]))
        ax.set_yticks(range(len(categories)), categories)
        ax.set(title=f"layer {layer}", xlabel="expert")
        ax.grid(False)
        for (i, j), v in np.ndenumerate(share):
            if v >= 0.2:
                colour = "black" if v > 0.6 * max(0.5, share.max()) else "white"
                ax.text(j, i, f"{v:.0%}", ha="center", va="center", fontsize=6, color=colour)
        colorbar(fig, im, ax, "share of the category's token-slots")
    return fig


def plot_specialisation(
    routing: dict[str, list[list[float]]],
    categories: list[str],
    path: str | Path,
    title: str = "",
) -> Path:
    """Writes `specialisation_figure` as a PNG; returns its path."""
    return save_figure(specialisation_figure(routing, categories, title), path)
