"""Each task's own analysis figures, drawn when training ends and by `moekit plot`.

The task computes (`SignalsTask.forecasts`, `Trajectories3DTask.rollouts`); the figures are
drawn here, keyed by the task's registered name. A task without figures draws none.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from moekit.model.task import Task
from moekit.viz.figure import save_figure
from moekit.viz.signals import plot_signal_analysis
from moekit.viz.trajectories import plot_trajectory_analysis, rollouts_figure


def signals_figures(task: Any, model: nn.Module, out_dir: Path) -> list[Path]:
    """Forecasts against truth per family, error by family and the error spectrum."""
    truth, pred = task.forecasts(model)
    return plot_signal_analysis(truth, pred, list(task.categories), out_dir)


def trajectories_figures(task: Any, model: nn.Module, out_dir: Path) -> list[Path]:
    """Rollouts in 3D and in 2D projections, and error growth over the rollout per family."""
    paths, pred, horizon = task.rollouts(model)
    paths_np, pred_np, names = paths.numpy(), pred.numpy(), list(task.categories)
    figure = rollouts_figure(paths_np[:, 0], pred_np[:, 0], names, horizon)
    return [
        save_figure(figure, out_dir / "trajectories3d.png"),
        *plot_trajectory_analysis(paths_np, pred_np, names, horizon, out_dir),
    ]


TASK_FIGURES: dict[str, Callable[[Any, nn.Module, Path], list[Path]]] = {
    "signals": signals_figures,
    "trajectories3d": trajectories_figures,
}


def task_figures(task: Task, model: nn.Module, out_dir: str | Path) -> list[Path]:
    """The analysis figures of `task` for `model`, written into out_dir."""
    draw = TASK_FIGURES.get(task.name)
    return draw(task, model, Path(out_dir)) if draw is not None else []
