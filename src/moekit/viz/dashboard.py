"""The training dashboard: losses, the task's metric, throughput, peak memory, drops, load
health and expert load over time.

A panel is drawn only when the run logged something for it: a dense model has no load
heatmaps, a dropless one no dropped-slots panel, an older log no peak-memory panel. Per-step
expert load is mostly sampling noise, so the heatmaps show a moving mean over a window of
logged steps. The line panels fill the rows above; the heatmaps share the rows below, one
colour scale and one colour bar.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from moekit.viz.figure import save_figure
from moekit.viz.style import FIGURE_WIDTH_PANELS, colorbar, grid_cols, hide_unused, styled

COLS = 3
# how a task's metric (its `metric` name in the eval records) reads on an axis
METRIC_LABELS = {"mse": "MSE", "err3d": "mean 3D error", "bpb": "bits per byte"}


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), int | float)]
    return [p[0] for p in pts], [p[1] for p in pts]


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving mean over the last axis, shorter at the start: [..., N] -> [..., N]."""
    if window <= 1:
        return values
    csum = np.cumsum(values, axis=-1)
    out = csum.copy()
    out[..., window:] = csum[..., window:] - csum[..., :-window]
    counts = np.minimum(np.arange(1, values.shape[-1] + 1), window)
    return out / counts


def load_window(n_steps: int) -> int:
    """Moving-mean window of the load heatmaps: about 1/40 of the logged steps, at least 1."""
    return max(1, n_steps // 40)


def _loss_panel(ax: Axes, train: list[dict], evals: list[dict], aux: bool) -> None:
    if aux:  # the total underneath (wide, pale) and the task loss on top (thin): both visible
        ax.plot(*_series(train, "loss"), lw=3.5, alpha=0.35, label="train loss (task + aux)")
        ax.plot(*_series(train, "task_loss"), lw=1.0, color="black", label="train task loss")
    else:  # no aux loss: the total is the task loss
        ax.plot(*_series(train, "loss"), lw=1.0, color="black", label="train loss")
    if evals:
        ax.plot(*_series(evals, "val_loss"), "o-", ms=3, color="tab:red", label="val loss")
    ax.set_yscale("log")
    ax.set(title="loss", xlabel="step", ylabel="loss (log)")
    ax.legend()


def _metric_panel(ax: Axes, evals: list[dict], metric: str) -> None:
    label = METRIC_LABELS.get(metric, metric)
    ax.plot(*_series(evals, metric), "o-", ms=3, color="tab:red")
    ax.set(title=f"validation {label}", xlabel="step", ylabel=label)


def _dropped_panel(ax: Axes, train: list[dict], layers: list[str]) -> None:
    steps = [r["step"] for r in train]
    for layer in layers:
        ax.plot(steps, [100 * r["dropped_fraction"][layer] for r in train], label=f"layer {layer}")
    ax.set(title="dropped token-slots", xlabel="step", ylabel="% of token-slots")
    ax.legend()


def _load_ratios(train: list[dict], layers: list[str]) -> tuple[dict[str, np.ndarray], int]:
    """Per layer the smoothed load over the uniform share [E, steps] (1 = even), and the window."""
    out = {}
    window = load_window(len(train))
    for layer in layers:
        load = np.array([r["expert_load"][layer] for r in train], dtype=float).T  # [E, steps]
        out[layer] = smooth(load * load.shape[0], window)
    return out, window


def _load_panel(
    ax: Axes, train: list[dict], layer: str, ratio: np.ndarray, top: float, window: int
) -> Any:
    E = ratio.shape[0]
    im = ax.imshow(
        ratio,
        aspect="auto",
        cmap="viridis",
        interpolation="nearest",
        extent=(train[0]["step"], train[-1]["step"], E - 0.5, -0.5),
        vmin=0,
        vmax=top,
    )
    mean = f", mean of {window} steps" if window > 1 else ""
    ax.set(title=f"layer {layer}: expert load{mean}", xlabel="step", ylabel="expert")
    ax.yaxis.set_major_locator(MaxNLocator(nbins=min(E, 8), integer=True))
    ax.grid(False)
    return im


def _entropy_panel(ax: Axes, train: list[dict], layers: list[str]) -> None:
    """Load entropy per layer over log(E): 1 is a uniform load, 0 one expert takes everything."""
    for layer in layers:
        pts = [(r["step"], r["load_entropy"][layer]) for r in train if "load_entropy" in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=f"layer {layer}")
    collapsed = _flushed(train)[-1]["health"]["collapsed_layers"] if _flushed(train) else []
    title = "load entropy" + (f" (collapsed: layer {', '.join(collapsed)})" if collapsed else "")
    ax.set(title=title, xlabel="step", ylabel="entropy / log(E)", ylim=(0, 1.05))
    ax.legend()


def _dead_panel(ax: Axes, train: list[dict], layers: list[str]) -> None:
    """Dead experts per layer at each log flush; the legend names the ones dead now."""
    flushed = _flushed(train)
    steps = [r["step"] for r in flushed]
    for layer in layers:
        counts = [len(r["health"]["dead_experts"].get(layer, [])) for r in flushed]
        now = flushed[-1]["health"]["dead_experts"].get(layer, [])
        label = f"layer {layer}" + (f" (now {', '.join(map(str, now))})" if now else "")
        ax.step(steps, counts, where="post", label=label)
    ax.set(title="dead experts", xlabel="step", ylabel="experts")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend()


def _flushed(train: list[dict]) -> list[dict]:
    """The step records of log flushes, which carry the health counters."""
    return [r for r in train if "health" in r]


def _has_drops(train: list[dict], layers: list[str]) -> bool:
    return any(r.get("dropped_fraction", {}).get(layer, 0) > 0 for r in train for layer in layers)


@styled
def dashboard_figure(
    records: list[dict[str, Any]], title: str = "", metric: str | None = None
) -> Figure:
    """The dashboard of a run's log records (train and eval) as a Figure; `metric` is the
    task's metric name (run.json's "metric"), drawn in its own panel when evaluated."""
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    layers = sorted(train[-1].get("expert_load", {}), key=int) if train else []
    aux = any(r.get("aux_loss", 0) for r in train)
    panels = ["loss"]
    if metric and metric != "val_loss" and _series(evals, metric)[0]:  # val_loss: in "loss"
        panels.append("metric")
    panels += ["aux"] if aux else []
    if _has_drops(train, layers):
        panels.append("dropped")
    if _series(train, "tokens_per_s")[0]:
        panels.append("throughput")
    if _series(train, "peak_mem_mib")[0]:
        panels.append("memory")
    if any("load_entropy" in r for r in train):
        panels.append("entropy")
    if any(r["health"]["dead_experts"] for r in _flushed(train)):
        panels.append("dead")
    cols, maps = grid_cols(len(panels)), grid_cols(len(layers))
    rows, map_rows = -(-len(panels) // cols), -(-len(layers) // max(1, maps))
    width = max(cols, maps) * FIGURE_WIDTH_PANELS
    fig = Figure(figsize=(width, 3.3 * (rows + map_rows) + 0.4), layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(title or "training dashboard")
    lines, heat = fig.subfigures(2, 1, height_ratios=[rows, max(map_rows, 1e-3)]) if layers else (
        fig, None
    )  # fmt: skip
    axes = lines.subplots(rows, cols, squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        if panel == "loss":
            _loss_panel(ax, train, evals, aux)
        elif panel == "metric":
            _metric_panel(ax, evals, metric or "")
        elif panel == "aux":
            ax.plot(*_series(train, "aux_loss"))
            ax.set(title="router aux loss (weighted)", xlabel="step", ylabel="aux loss")
        elif panel == "dropped":
            _dropped_panel(ax, train, layers)
        elif panel == "throughput":
            ax.plot(*_series(train, "tokens_per_s"))
            ax.set(title="throughput", xlabel="step", ylabel="tokens/s")
        elif panel == "memory":
            ax.plot(*_series(train, "peak_mem_mib"))
            ax.set(title="peak memory", xlabel="step", ylabel="MiB")
        elif panel == "entropy":
            _entropy_panel(ax, train, layers)
        else:
            _dead_panel(ax, train, layers)
    hide_unused(axes, len(panels))
    if heat is not None:
        ratios, window = _load_ratios(train, layers)
        top = max(2.0, *(float(r.max()) for r in ratios.values()))
        grid = heat.subplots(map_rows, maps, squeeze=False)
        ims = [
            _load_panel(ax, train, layer, ratios[layer], top, window)
            for ax, layer in zip(grid.flat, layers, strict=False)
        ]
        hide_unused(grid, len(layers))
        colorbar(heat, ims[0], list(grid.flat[: len(layers)]), "load / uniform share")
    return fig


def plot_dashboard(
    records: list[dict[str, Any]], path: str | Path, title: str = "", metric: str | None = None
) -> Path:
    """One PNG from a run's log records (train and eval); returns its path."""
    return save_figure(dashboard_figure(records, title, metric), path)
