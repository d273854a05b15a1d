"""3D forecast plots: rollouts against the true trajectories, 2D projections, error growth.

A rollout sees the first S = L - H points of a path and predicts the remaining H, each
prediction fed back as the next input. Position, velocity (first difference) and
acceleration (second difference) errors are drawn against the rollout step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from moekit.tasks.trajectories3d import rollout
from moekit.viz.figure import save_figure
from moekit.viz.style import category_boxes, colors, figure_legend, new_figure, styled

PROJECTIONS = ((0, 1, "x-y"), (0, 2, "x-z"), (1, 2, "y-z"))


@styled
def rollouts_figure(paths: np.ndarray, pred: np.ndarray, names: list[str], horizon: int) -> Figure:
    """One 3D panel per path [N, L, 3]: context, truth and forecast."""
    S = paths.shape[1] - horizon
    fig, axes = new_figure(
        1,
        len(names),
        panel=(3.6, 3.8),
        title=f"3D rollout: {S} context points, {horizon} forecast (predictions fed back)",
        layout="none",  # placed by hand: constrained layout lets 3D panels hit the title
        subplot_kw={"projection": "3d"},
    )
    fig.subplots_adjust(left=0.01, right=0.97, bottom=0.12, top=0.8, wspace=0.15)
    for i, (ax, name) in enumerate(zip(axes.flat, names, strict=True)):
        ax.plot(*paths[i, :S].T, color="grey", lw=1, label="context")
        ax.plot(*paths[i, S - 1 :].T, color="tab:blue", lw=1.5, label="truth")
        ax.plot(*pred[i, S - 1 :].T, color="tab:red", lw=1.5, ls="--", label="forecast")
        err = np.linalg.norm(pred[i, S:] - paths[i, S:], axis=-1).mean()
        ax.set_title(f"{name}\nmean 3D error {err:.3f}")
        ax.tick_params(labelsize=6)
    figure_legend(fig, axes.flat[0])
    return fig


def plot_rollouts(
    model: torch.nn.Module,
    paths: Tensor,
    names: tuple[str, ...] | list[str],
    path: str | Path,
    horizon: int = 12,
) -> Path:
    """paths [N, L, 3]: the model sees the first L - horizon points and rolls out the rest."""
    pred = rollout(model, paths, horizon)
    fig = rollouts_figure(paths.numpy(), pred.numpy(), list(names), horizon)
    return save_figure(fig, path)


@styled
def projections_figure(
    paths: np.ndarray, pred: np.ndarray, names: list[str], horizon: int
) -> Figure:
    """Rows x-y, x-z, y-z; one column per path [N, L, 3]: context, truth and forecast."""
    S = paths.shape[1] - horizon
    fig, axes = new_figure(3, len(names), panel=(2.9, 2.6), title="3D rollouts in 2D projections")
    for (a, b, label), row in zip(PROJECTIONS, axes, strict=True):
        for i, (ax, name) in enumerate(zip(row, names, strict=True)):
            ax.plot(paths[i, :S, a], paths[i, :S, b], color="grey", lw=0.8, label="context")
            ax.plot(paths[i, S - 1 :, a], paths[i, S - 1 :, b], color="tab:blue", label="truth")
            ax.plot(
                pred[i, S - 1 :, a], pred[i, S - 1 :, b], "--", color="tab:red", label="forecast"
            )
            ax.set(title=f"{name}: {label}", xlabel=label[0], ylabel=label[2])
            ax.set_aspect("equal", adjustable="datalim")
    figure_legend(fig, axes[0, 0])
    return fig


def rollout_errors(paths: np.ndarray, pred: np.ndarray, horizon: int) -> dict[str, np.ndarray]:
    """Euclidean errors per rollout step of position, velocity, acceleration: each [..., H].

    paths, pred [..., L, 3]; differences include the last context points, so step 1's
    velocity is the first predicted point minus the last seen one.
    """
    S = paths.shape[-2] - horizon
    out = {}
    for name, order in (("position", 0), ("velocity", 1), ("acceleration", 2)):
        t, p = paths[..., S - order :, :], pred[..., S - order :, :]
        for _ in range(order):
            t, p = np.diff(t, axis=-2), np.diff(p, axis=-2)
        out[name] = np.linalg.norm(p - t, axis=-1)
    return out


@styled
def errors_figure(paths: np.ndarray, pred: np.ndarray, names: list[str], horizon: int) -> Figure:
    """paths, pred [C, N, L, 3]: error growth per category (mean, 10-90% band) and a box plot."""
    errs = rollout_errors(paths, pred, horizon)  # each [C, N, H]
    palette = colors(names)
    steps = np.arange(1, horizon + 1)
    fig, axes = new_figure(2, 2, panel=(5.0, 3.4), title="3D rollout errors by step")
    for ax, (kind, err) in zip(axes.flat, errs.items(), strict=False):
        for c, name in enumerate(names):
            lo, hi = np.percentile(err[c], [10, 90], axis=0)
            ax.plot(steps, err[c].mean(0), color=palette[name], label=name)
            ax.fill_between(steps, lo, hi, color=palette[name], alpha=0.12, lw=0)
        ax.set(title=f"{kind} error vs rollout step", xlabel="rollout step", ylabel="error")
    axes[0, 0].legend(ncol=2)
    ax = axes[1, 1]
    category_boxes(ax, list(errs["position"].mean(-1)), names, palette)
    ax.set(title="mean position error by category", xlabel="mean 3D error over the rollout")
    return fig


def plot_trajectory_analysis(
    paths: np.ndarray, pred: np.ndarray, names: list[str], horizon: int, out_dir: str | Path
) -> list[Path]:
    """paths, pred [C, N, L, 3]: projections of each category's first path and error growth."""
    out = Path(out_dir)
    first, first_pred = paths[:, 0], pred[:, 0]
    return [
        save_figure(
            projections_figure(first, first_pred, names, horizon),
            out / "trajectories3d_projections.png",
        ),
        save_figure(errors_figure(paths, pred, names, horizon), out / "trajectories3d_errors.png"),
    ]
