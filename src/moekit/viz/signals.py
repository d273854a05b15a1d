"""Analysis plots of the `signals` task: forecasts against truth, error by category, error spectrum.

Inputs are numpy arrays per category c: truth and one-step predictions [C, N, S] (N sequences
of S positions). The spectrum shows where the error lives: a peak at a signal's own
frequency is a forecast that lags or misjudges the amplitude, a flat floor is noise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from moekit.viz.figure import save_figure
from moekit.viz.style import (
    category_boxes,
    colors,
    figure_legend,
    hide_unused,
    new_figure,
    styled,
)

COLS = 3


@styled
def forecasts_figure(truth: np.ndarray, pred: np.ndarray, categories: list[str]) -> Figure:
    """One panel per category: the first sequence's truth and one-step forecast over time."""
    C, _, S = truth.shape
    rows = -(-C // COLS)
    fig, axes = new_figure(
        rows, COLS, panel=(4.0, 2.3), title="signals: one-step forecast vs truth (first sequence)"
    )
    steps = np.arange(1, S + 1)
    for c, ax in enumerate(axes.flat[:C]):
        ax.plot(steps, truth[c, 0], color="tab:blue", label="truth")
        ax.plot(steps, pred[c, 0], color="tab:red", ls="--", label="forecast")
        ax.set(title=categories[c], xlabel="position", ylabel="value")
    figure_legend(fig, axes.flat[0])
    hide_unused(axes, C)
    return fig


def error_spectrum(err: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean amplitude spectrum of errors [N, S] -> (frequencies [F] in cycles/step, |FFT| [F])."""
    centred = err - err.mean(-1, keepdims=True)
    amp = np.abs(np.fft.rfft(centred, axis=-1)) / err.shape[-1]
    return np.fft.rfftfreq(err.shape[-1]), amp.mean(0)


@styled
def errors_figure(truth: np.ndarray, pred: np.ndarray, categories: list[str]) -> Figure:
    """Prediction vs truth, per-category RMSE (one box per category) and error spectra."""
    err = pred - truth  # [C, N, S]
    palette = colors(categories)
    fig, axes = new_figure(1, 3, panel=(4.8, 3.8), title="signals: one-step forecast errors")
    ax = axes[0, 0]
    for c, name in enumerate(categories):
        ax.scatter(truth[c].ravel(), pred[c].ravel(), s=2, alpha=0.3, color=palette[name])
    lo, hi = float(truth.min()), float(truth.max())
    ax.plot([lo, hi], [lo, hi], color="black", lw=0.8, label="perfect forecast")
    ax.set(title="prediction vs truth", xlabel="true next value", ylabel="predicted next value")
    ax.legend(loc="upper left")

    ax = axes[0, 1]
    rmse = np.sqrt((err**2).mean(-1))  # [C, N] per sequence
    category_boxes(ax, list(rmse), categories, palette)
    ax.set(title="error by category", xlabel="RMSE per sequence")

    ax = axes[0, 2]
    for c, name in enumerate(categories):
        freq, amp = error_spectrum(err[c])
        ax.plot(freq[1:], amp[1:], color=palette[name], lw=1, label=name)
    ax.set_yscale("log")
    ax.set(
        title="error spectrum (FFT)", xlabel="frequency (cycles / step)", ylabel="|FFT| of error"
    )
    ax.legend(ncol=2, fontsize=7)
    return fig


def plot_signal_analysis(
    truth: np.ndarray, pred: np.ndarray, categories: list[str], out_dir: str | Path
) -> list[Path]:
    """signals_forecasts.png and signals_errors.png in out_dir; returns their paths."""
    out = Path(out_dir)
    return [
        save_figure(forecasts_figure(truth, pred, categories), out / "signals_forecasts.png"),
        save_figure(errors_figure(truth, pred, categories), out / "signals_errors.png"),
    ]
