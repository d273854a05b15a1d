import json

import numpy as np
import pytest

from moekit.viz import category_shares, plot_dashboard, plot_run, plot_specialisation


def _records(steps=6, layers=("0", "2"), E=4):
    recs = []
    for s in range(1, steps + 1):
        load = np.roll(np.arange(1, E + 1) / (E * (E + 1) / 2), s).tolist()
        recs.append(
            {
                "kind": "train",
                "step": s,
                "loss": 1.0 / s,
                "task_loss": 0.9 / s,
                "tokens_per_s": 1000.0 + s,
                "expert_load": {layer: load for layer in layers},
                "dropped_fraction": {layer: 0.01 * s for layer in layers},
            }
        )
    recs.append(
        {
            "kind": "eval",
            "step": steps,
            "val_loss": 0.2,
            "routing": {layer: [[5, 0, 0, 1], [0, 3, 3, 0]] for layer in layers},
        }
    )
    return recs


def test_category_shares_rows_sum_to_one_and_empty_rows_stay_zero():
    shares = category_shares([[3, 1], [0, 0]])
    assert shares.tolist() == [[0.75, 0.25], [0.0, 0.0]]


def test_plots_are_written_as_png(tmp_path):
    dash = plot_dashboard(_records(), tmp_path / "d.png")
    spec = plot_specialisation(_records()[-1]["routing"], ["a", "b"], tmp_path / "s.png")
    for path in (dash, spec):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size > 5_000


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
