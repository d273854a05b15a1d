import numpy as np
import pytest
import torch

from moekit.tasks import TaskConfig, build_task
from moekit.tasks.trajectories3d import kepler, random_rotation


def test_batches_are_deterministic_unit_scale_and_labelled():
    task = build_task(TaskConfig(name="trajectories3d", seq_len=24, options={"noise": 0.0}), seed=1)
    a, b = task.train_batch(2, 1, 20), task.train_batch(2, 1, 20)
    assert torch.equal(a.x, b.x)
    assert a.x.shape == a.y.shape == (20, 24, 3)
    assert torch.equal(a.x[:, 1:], a.y[:, :-1])
    spread = torch.cat([a.x, a.y[:, -1:]], 1).square().sum(-1).mean(1)
    assert torch.allclose(spread, torch.ones(20), atol=1e-4)


def test_kepler_orbit_is_a_closed_ellipse_and_rotation_is_proper():
    gen = torch.Generator().manual_seed(0)
    t = torch.arange(400.0)
    pos = kepler(t, gen)
    r = pos.norm(dim=-1)
    # focus at the origin: r ranges over [a(1-e), a(1+e)] with a = 1
    assert r.min() > 0.29 and r.max() < 1.71 and (r.max() + r.min() - 2).abs() < 1e-2
    R = random_rotation(gen)
    assert torch.allclose(R @ R.T, torch.eye(3), atol=1e-5) and torch.det(R) > 0


def test_loss_halves_in_a_short_run_and_3d_plot(tmp_path, train_briefly):
    task = TaskConfig(name="trajectories3d", seq_len=32, val_sequences=64)
    trainer, before, after = train_briefly(tmp_path, task, steps=40, lr=5e-3)
    assert after["val"]["mse"] <= 0.5 * before["mse"]
    assert after["val"]["err3d"] < before["err3d"]
    assert (tmp_path / "plots" / "trajectories3d.png").stat().st_size > 10_000


def test_correlation_is_pearson_per_axis_averaged():
    task = build_task(TaskConfig(name="trajectories3d", seq_len=16), seed=2)
    batch = task.train_batch(0, 0, 6)
    gen = torch.Generator().manual_seed(0)
    out = batch.y * torch.tensor([1.0, -0.5, 2.0]) + 0.2 * torch.randn(batch.y.shape, generator=gen)
    m = task.metrics(out, batch, ((out - batch.y) ** 2).mean())
    pred, true = out.reshape(-1, 3).numpy(), batch.y.reshape(-1, 3).numpy()
    want = np.mean([np.corrcoef(pred[:, d], true[:, d])[0, 1] for d in range(3)])
    assert set(m) == {"err3d", "mse", "corr"}
    assert float(m["corr"]) == pytest.approx(want, abs=1e-5)
