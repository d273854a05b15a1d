"""Routing specialisation: which experts each input category is sent to, per MoE layer."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from moekit.viz.figure import save_figure  # noqa: E402


def category_shares(counts: list[list[float]]) -> np.ndarray:
    """[C, E] counts -> each category's share of its token-slots per expert (rows sum to 1)."""
    c = np.asarray(counts, dtype=float)
    return c / np.maximum(c.sum(1, keepdims=True), 1.0)


def plot_specialisation(
    routing: dict[str, list[list[float]]],
    categories: list[str],
    path: str | Path,
    title: str = "",
) -> Path:
    """Heatmap per layer: rows = input categories, columns = experts, colour = share."""
    layers = sorted(routing, key=int)
    n = max(1, len(layers))
    fig, axes = plt.subplots(1, n, figsize=(3.2 + 0.45 * 8 * n, 0.4 * len(categories) + 1.8))
    axes = np.atleast_1d(axes)
    for ax, layer in zip(axes, layers, strict=False):
        share = category_shares(routing[layer])
        E = share.shape[1]
        im = ax.imshow(share, cmap="magma", vmin=0, vmax=max(0.5, float(share.max())))
        ax.set_xticks(range(E))
        ax.set_yticks(range(len(categories)), categories)
        ax.set(title=f"layer {layer}", xlabel="expert")
        for (i, j), v in np.ndenumerate(share):
            if v >= 0.2:
                ax.text(j, i, f"{v:.0%}", ha="center", va="center", fontsize=6, color="black")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(title or "routing specialisation: share of each category's tokens per expert")
    return save_figure(fig, path)
