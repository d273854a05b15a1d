import json

import numpy as np
import pytest

from moekit.viz import (
    category_shares,
    dashboard_figure,
    plot_dashboard,
    plot_run,
    plot_specialisation,
    read_panels,
)
from moekit.viz.dashboard import load_window, smooth
from moekit.viz.style import text_overlaps


def _records(steps=6, layers=("0", "2"), E=4, drop=0.01, moe=True, metric=None, mem=False):
    """A made-up run log; `metric` adds that task metric to evaluations every few steps, `mem`
    the peak memory to the step records."""
    recs = []
    for s in range(1, steps + 1):
        load = np.roll(np.arange(1, E + 1) / (E * (E + 1) / 2), s).tolist()
        rec = {"kind": "train", "step": s, "loss": 1.0 / s, "task_loss": 0.9 / s}
        rec["tokens_per_s"] = 1000.0 + s
        if mem:
            rec["peak_mem_mib"] = 51_200.0 + 10 * min(s, 20)
        if moe:
            rec["aux_loss"] = 0.1 / s
            rec["expert_load"] = {layer: load for layer in layers}
            rec["dropped_fraction"] = {layer: drop * s for layer in layers}
        recs.append(rec)
        if metric and s % max(1, steps // 5) == 0 and s < steps:
            recs.append({"kind": "eval", "step": s, "val_loss": 0.5 / s, metric: 0.4 / s})
    recs.append(
        {
            "kind": "eval",
            "step": steps,
            "val_loss": 0.2,
            **({metric: 0.15} if metric else {}),
            "routing": {layer: [[5, 0, 0, 1], [0, 3, 3, 0]] for layer in layers} if moe else {},
        }
    )
    return recs


def test_category_shares_rows_sum_to_one_and_empty_rows_stay_zero():
    shares = category_shares([[3, 1], [0, 0]])
    assert shares.tolist() == [[0.75, 0.25], [0.0, 0.0]]


def test_plots_are_written_as_png_with_their_panels(tmp_path):
    dash = plot_dashboard(_records(), tmp_path / "d.png")
    spec = plot_specialisation(_records()[-1]["routing"], ["a", "b"], tmp_path / "s.png")
    for path in (dash, spec):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size > 5_000
    assert read_panels(dash) == [
        "loss",
        "router aux loss (weighted)",
        "dropped token-slots",
        "throughput",
        "layer 0: expert load",
        "layer 2: expert load",
    ]
    assert read_panels(spec) == ["layer 0", "layer 2"]


def test_dashboard_leaves_out_panels_without_data():
    dropless = dashboard_figure(_records(drop=0.0))
    dense = dashboard_figure(_records(moe=False))
    assert "dropped token-slots" not in [ax.get_title() for ax in dropless.axes]
    assert [ax.get_title() for ax in dense.axes] == ["loss", "throughput"]


def test_dashboard_draws_the_task_metric_and_peak_memory_when_logged():
    fig = dashboard_figure(_records(metric="err3d", mem=True), metric="err3d")
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[:2] == ["loss", "validation mean 3D error"]
    assert "peak memory" in titles
    metric_ax = fig.axes[1]
    assert metric_ax.lines[0].get_ydata()[-1] == 0.15  # the last evaluation's err3d
    # without the metric's name, or for val_loss (already in the loss panel): no such panel
    for fig in (
        dashboard_figure(_records(metric="err3d")),
        dashboard_figure(_records(), metric="val_loss"),
    ):
        assert not any(ax.get_title().startswith("validation") for ax in fig.axes)
        assert "peak memory" not in [ax.get_title() for ax in fig.axes]


def test_every_colour_bar_is_labelled_and_no_text_overlaps():
    fig = dashboard_figure(_records(steps=200))
    bars = [ax for ax in fig.axes if not ax.get_title()]
    assert len(bars) == 1 and all(ax.get_ylabel() == "load / uniform share" for ax in bars)
    heatmaps = [ax for ax in fig.axes if "expert load" in ax.get_title()]
    assert len(heatmaps) == 2 and len({ax.images[0].get_clim() for ax in heatmaps}) == 1
    assert "layer 0: expert load, mean of 5 steps" in [ax.get_title() for ax in fig.axes]
    assert text_overlaps(fig) == []


def test_load_heatmap_is_a_trailing_moving_mean():
    x = np.array([[0.0, 2.0, 4.0, 6.0]])
    assert smooth(x, 2).tolist() == [[0.0, 1.0, 3.0, 5.0]]
    assert smooth(x, 1) is x
    assert load_window(39) == 1 and load_window(400) == 10


def test_plot_run_redraws_from_logs(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records()))
    (tmp_path / "run.json").write_text(
        json.dumps({"task": "signals", "categories": ["a", "b"], "moe_layers": [0, 2]})
    )
    paths = plot_run(tmp_path)
    assert [p.name for p in paths] == ["dashboard.png", "specialisation.png"]


def test_plot_run_without_logs_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError):
        plot_run(tmp_path)
