"""Plots from run logs and checkpoints (matplotlib, Agg backend, PNG files, one style)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from moekit.viz.dashboard import dashboard_figure, plot_dashboard
from moekit.viz.figure import read_panels, save_figure
from moekit.viz.routing import category_shares, plot_specialisation, specialisation_figure
from moekit.viz.tasks import task_figures

if TYPE_CHECKING:
    from torch import nn

    from moekit.model.task import Task


def plot_run(run_dir: str | Path) -> list[Path]:
    """(Re)draw a run's dashboard and specialisation heatmap into run_dir/plots/."""
    from moekit.train.logging import read_log

    run_dir = Path(run_dir)
    records = read_log(run_dir)
    info = json.loads((run_dir / "run.json").read_text())
    name = f"{info['task']} ({'MoE' if info['moe_layers'] else 'dense'})"
    dashboard = run_dir / "plots" / "dashboard.png"
    paths = [plot_dashboard(records, dashboard, title=name, metric=info.get("metric"))]
    evals = [r for r in records if r.get("kind") == "eval" and r.get("routing")]
    if evals:
        path = run_dir / "plots" / "specialisation.png"
        title = f"{name}: share of each category's tokens per expert (step {evals[-1]['step']})"
        paths.append(plot_specialisation(evals[-1]["routing"], info["categories"], path, title))
    return paths


def plot_training(run_dir: Path, task: Task, model: nn.Module | None) -> list[Path]:
    """What a training run draws (a `Trainer`'s plotter): the dashboard, and at the end
    (`model` given) the task's own figures."""
    paths = plot_run(run_dir)
    if model is not None:
        paths += task_figures(task, model, Path(run_dir) / "plots")
    return paths


def plot_task(run_dir: str | Path) -> list[Path]:
    """The task's own analysis figures of a run's best checkpoint, in plots/."""
    from moekit.model.store import load_files, pick_checkpoint
    from moekit.tasks import build_task
    from moekit.train.checkpoint import run_config_of

    ckpt = pick_checkpoint(run_dir)
    cfg = run_config_of(ckpt)
    task = build_task(cfg.task, cfg.seed)
    return task_figures(task, load_files(ckpt), Path(run_dir) / "plots")


__all__ = [
    "category_shares",
    "dashboard_figure",
    "plot_dashboard",
    "plot_run",
    "plot_specialisation",
    "plot_task",
    "plot_training",
    "read_panels",
    "save_figure",
    "specialisation_figure",
]
