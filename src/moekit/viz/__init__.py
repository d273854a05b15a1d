"""Plots from run logs (matplotlib, Agg backend, PNG files)."""

from __future__ import annotations

import json
from pathlib import Path

from moekit.viz.dashboard import plot_dashboard
from moekit.viz.routing import category_shares, plot_specialisation


def plot_run(run_dir: str | Path) -> list[Path]:
    """(Re)draw a run's dashboard and specialisation heatmap into run_dir/plots/."""
    from moekit.train.logging import read_log

    run_dir = Path(run_dir)
    records = read_log(run_dir)
    info = json.loads((run_dir / "run.json").read_text())
    name = f"{info['task']} ({'MoE' if info['moe_layers'] else 'dense'})"
    paths = [plot_dashboard(records, run_dir / "plots" / "dashboard.png", title=name)]
    evals = [r for r in records if r.get("kind") == "eval" and r.get("routing")]
    if evals:
        path = run_dir / "plots" / "specialisation.png"
        title = f"{name}: share of each category's tokens per expert (step {evals[-1]['step']})"
        paths.append(plot_specialisation(evals[-1]["routing"], info["categories"], path, title))
    return paths


__all__ = ["category_shares", "plot_dashboard", "plot_run", "plot_specialisation"]
