import numpy as np
import pytest
import torch

from moekit.tasks import TaskConfig, build_task


def test_batches_are_deterministic_and_labelled():
    task = build_task(TaskConfig(name="signals", seq_len=20), seed=3)
    a, b = task.train_batch(5, 0, 12), task.train_batch(5, 0, 12)
    assert torch.equal(a.x, b.x) and torch.equal(a.category, b.category)
    assert not torch.equal(a.x, task.train_batch(6, 0, 12).x)
    assert a.x.shape == a.y.shape == (12, 20, 1)
    assert torch.equal(a.x[:, 1:], a.y[:, :-1])  # the target is the next value
    assert a.category.min() >= 0 and a.category.max() < len(task.categories)
    assert (a.category == a.category[:, :1]).all()  # one family per sequence
    assert a.x.abs().max() < 2.0


def test_every_family_appears_and_varies():
    task = build_task(TaskConfig(name="signals", options={"noise": 0.0}))
    batch = task.train_batch(0, 0, 400)
    cats = batch.category[:, 0]
    assert set(cats.tolist()) == set(range(len(task.categories)))
    for c in range(len(task.categories)):
        assert batch.x[cats == c].std() > 0.2, task.categories[c]


def test_loss_halves_in_a_short_run(tmp_path, train_briefly):
    task = TaskConfig(name="signals", seq_len=32, val_sequences=64)
    _, before, after = train_briefly(tmp_path, task, steps=40, lr=5e-3)
    assert after["val"]["mse"] <= 0.5 * before["mse"]


def test_metrics_report_correlation_beside_mse_and_mae():
    task = build_task(TaskConfig(name="signals", seq_len=20), seed=1)
    batch = task.train_batch(0, 0, 8)
    out = batch.y + 0.3 * torch.randn(batch.y.shape, generator=torch.Generator().manual_seed(0))
    m = task.metrics(out, batch, ((out - batch.y) ** 2).mean())
    want = np.corrcoef(out.reshape(-1).numpy(), batch.y.reshape(-1).numpy())[0, 1]
    assert set(m) == {"mse", "mae", "corr"}
    assert float(m["corr"]) == pytest.approx(want, abs=1e-5)
