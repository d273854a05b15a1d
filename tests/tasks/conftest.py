"""Shared set-up of the task tests: a tiny MoE transformer trained briefly on a task."""

import pytest

import moekit
from moekit.model import ModelConfig
from moekit.tasks import TaskConfig
from moekit.train import RunConfig, TrainConfig, Trainer
from moekit.viz import plot_training


def _train_briefly(tmp_path, task: TaskConfig, steps: int, lr: float):
    """Returns (trainer, metrics before training, metrics after `steps` steps)."""
    cfg = RunConfig(
        task=task,
        model=ModelConfig(
            d_model=32,
            n_layers=2,
            n_heads=2,
            d_ff=64,
            max_seq_len=task.seq_len,
            moe=moekit.MoEConfig(d_model=32, d_hidden=32, n_experts=4, k=2),
        ),
        train=TrainConfig(
            steps=steps,
            batch_size=16,
            lr=lr,
            warmup_steps=5,
            eval_interval=steps,
            live="off",
            threads=1,
        ),
        out=str(tmp_path),
    )
    trainer = Trainer(cfg, plotter=plot_training)
    before = trainer.evaluate()
    return trainer, before, trainer.fit()


@pytest.fixture
def train_briefly():
    return _train_briefly
