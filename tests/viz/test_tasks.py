"""Each task's analysis figures (`viz.tasks`, what `moekit plot` draws) on an untrained model."""

import numpy as np
import pytest
from matplotlib.image import imread

from moekit.tasks import TaskConfig, build_task
from moekit.tasks.signals import CATEGORIES as SIGNALS
from moekit.tasks.trajectories3d import CATEGORIES as PATHS
from moekit.viz import read_panels
from moekit.viz.signals import error_spectrum
from moekit.viz.tasks import task_figures
from moekit.viz.trajectories import rollout_errors


def _opens(path):
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 600
    return read_panels(path)


def test_signals_plots_forecasts_errors_and_spectrum(tmp_path, tiny_model):
    task = build_task(TaskConfig(name="signals", seq_len=24), seed=0)
    model = tiny_model(vocab_size=None, d_in=1, d_out=1)
    forecasts, errors = task_figures(task, model, tmp_path)
    assert [p.name for p in (forecasts, errors)] == ["signals_forecasts.png", "signals_errors.png"]
    assert _opens(forecasts) == list(SIGNALS)
    assert _opens(errors) == ["prediction vs truth", "error by category", "error spectrum (FFT)"]


def test_trajectory_plots_rollouts_projections_and_error_growth(tmp_path, tiny_model):
    task = build_task(TaskConfig(name="trajectories3d", seq_len=16), seed=0)
    model = tiny_model(vocab_size=None, d_in=3, d_out=3, max_seq_len=16)
    paths = task_figures(task, model, tmp_path)
    assert [p.name for p in paths] == [
        "trajectories3d.png",
        "trajectories3d_projections.png",
        "trajectories3d_errors.png",
    ]
    assert len(_opens(paths[0])) == len(PATHS)
    assert (
        _opens(paths[1])[:2] == ["helix: x-y", "kepler: x-y"] and len(read_panels(paths[1])) == 15
    )
    assert _opens(paths[2]) == [
        "position error vs rollout step",
        "velocity error vs rollout step",
        "acceleration error vs rollout step",
        "mean position error by category",
    ]


def test_rollout_errors_of_a_constant_velocity_miss():
    t = np.arange(6.0)[:, None] * np.array([1.0, 0.0, 0.0])  # [L, 3] moving along x
    pred = t.copy()
    pred[3:] += np.array([0.0, 1.0, 0.0]) * np.arange(1, 4)[:, None]  # drifts 1/step along y
    errs = rollout_errors(t, pred, horizon=3)
    assert errs["position"].tolist() == [1.0, 2.0, 3.0]
    assert errs["velocity"].tolist() == [1.0, 1.0, 1.0]
    assert errs["acceleration"].tolist() == pytest.approx([1.0, 0.0, 0.0])


def test_error_spectrum_peaks_at_the_error_frequency():
    steps = np.arange(64)
    err = np.sin(2 * np.pi * 8 / 64 * steps)[None]  # 8 cycles in 64 steps
    freq, amp = error_spectrum(err)
    assert freq[amp.argmax()] == pytest.approx(8 / 64)
