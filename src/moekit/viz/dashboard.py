"""The training dashboard: loss curves, expert utilisation over time, drops, throughput."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from moekit.viz.figure import save_figure  # noqa: E402


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_dashboard(records: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """One PNG from a run's log records (train and eval); returns its path."""
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    layers = sorted(train[-1].get("expert_load", {}), key=int) if train else []
    n_maps = max(1, len(layers))
    fig = plt.figure(figsize=(15, 4.2 + 2.6 * ((n_maps + 2) // 3)))
    grid = fig.add_gridspec(1 + (n_maps + 2) // 3, 3)

    ax = fig.add_subplot(grid[0, 0])
    for key, label in (("loss", "train loss"), ("task_loss", "train task loss")):
        ax.plot(*_series(train, key), label=label, lw=1)
    if evals:
        ax.plot(*_series(evals, "val_loss"), "o-", label="val loss", ms=3)
    ax.set_yscale("log")
    ax.set(title="loss", xlabel="step")
    ax.legend(fontsize=8)

    ax = fig.add_subplot(grid[0, 1])
    for layer in layers:
        steps = [r["step"] for r in train]
        ax.plot(steps, [100 * r["dropped_fraction"][layer] for r in train], label=f"layer {layer}")
    ax.set(title="dropped token-slots (%)", xlabel="step")
    if layers:
        ax.legend(fontsize=8)

    ax = fig.add_subplot(grid[0, 2])
    ax.plot(*_series(train, "tokens_per_s"), lw=1)
    ax.set(title="throughput (tokens/s)", xlabel="step")

    for j, layer in enumerate(layers):
        ax = fig.add_subplot(grid[1 + j // 3, j % 3])
        load = np.array([r["expert_load"][layer] for r in train]).T  # [E, steps]
        E = load.shape[0]
        im = ax.imshow(
            load * E,
            aspect="auto",
            cmap="viridis",
            interpolation="nearest",
            extent=(train[0]["step"], train[-1]["step"], E - 0.5, -0.5),
            vmin=0,
            vmax=max(2.0, float((load * E).max())),
        )
        ax.set(title=f"layer {layer}: expert load / uniform", xlabel="step", ylabel="expert")
        fig.colorbar(im, ax=ax)
    fig.suptitle(title or "training dashboard")
    return save_figure(fig, path)
