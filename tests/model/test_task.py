"""The task registry: tasks found by name, each with its own options, one defined out here."""

import json
from dataclasses import dataclass

import pytest
import torch

from moekit import cli
from moekit.model.task import (
    Batch,
    Task,
    TaskConfig,
    available_tasks,
    build_task,
    register_task,
    task_class,
)
from moekit.tasks.signals import SignalsTask


@dataclass
class RampOptions:
    slope: float = 0.1  # increment between neighbouring positions

    def __post_init__(self) -> None:
        if self.slope <= 0:
            raise ValueError(f"task.options.slope={self.slope} must be > 0")


@register_task("test-ramp", options=RampOptions)
class RampTask(Task):
    """Continue a ramp with a random start: x_t = start + slope * t, predict x_{t+1}."""

    categories = ("up", "down")
    metric = "mse"

    def model_fields(self) -> dict[str, int | None]:
        return {"vocab_size": None, "d_in": 1, "d_out": 1}

    def make_batch(self, gen: torch.Generator, batch_size: int, split: str) -> Batch:
        S = self.cfg.seq_len
        sign = torch.randint(0, 2, (batch_size,), generator=gen)  # [B] 0 = up, 1 = down
        start = torch.rand(batch_size, 1, generator=gen) - 0.5  # [B, 1]
        slope = self.options.slope * (1 - 2 * sign[:, None].float())  # [B, 1]
        series = start + slope * torch.arange(S + 1)  # [B, S+1]
        cats = sign[:, None].expand(-1, S).contiguous()
        return Batch(series[:, :-1, None], series[:, 1:, None], cats)

    def metrics(self, out: torch.Tensor, batch: Batch, task_loss: torch.Tensor) -> dict:
        return {"mse": task_loss.detach()}


def test_builtin_tasks_are_registered_with_their_options():
    assert {"signals", "trajectories3d", "text"} <= set(available_tasks())
    assert task_class("signals") is SignalsTask
    assert build_task(TaskConfig(name="signals")).options.noise == 0.01  # the default
    assert build_task(TaskConfig(name="signals", options={"noise": 0.0})).options.noise == 0.0


def test_bad_task_names_and_options_are_named():
    with pytest.raises(ValueError, match="task.name='nope'"):
        TaskConfig(name="nope")
    with pytest.raises(ValueError, match="task.options.max_bytes is not an option of task"):
        TaskConfig(name="signals", options={"max_bytes": 10})
    with pytest.raises(ValueError, match="task.options.noise=2"):
        TaskConfig(name="trajectories3d", options={"noise": 2})
    with pytest.raises(ValueError, match="task.options.slope=-1"):
        TaskConfig(name="test-ramp", options={"slope": -1})
    with pytest.raises(ValueError, match="already registered"):
        register_task("signals")(RampTask)


def test_flat_layout_of_older_runs_still_loads():
    old = {"name": "text", "seq_len": 32, "noise": 0.01, "max_bytes": 5000, "val_every": 4}
    cfg = TaskConfig.from_dict(old)
    assert cfg.options == {"max_bytes": 5000, "val_every": 4}  # noise was unused by text
    assert TaskConfig.from_dict({"name": "signals", "noise": 0.2}).options == {"noise": 0.2}


def test_batches_are_unchanged_by_the_registry():
    task = build_task(TaskConfig(name="signals", seq_len=12, options={"noise": 0.0}), seed=5)
    direct = SignalsTask(TaskConfig(name="signals", seq_len=12, options={"noise": 0.0}), seed=5)
    assert torch.equal(task.train_batch(3, 0, 4).x, direct.train_batch(3, 0, 4).x)


def test_a_task_defined_outside_the_package_trains_through_the_cli(tmp_path, capsys):
    run = tmp_path / "run"
    cli.main(
        [
            "train",
            "--task.name=test-ramp",
            "--task.seq_len=16",
            "--task.val_sequences=16",
            "--task.options.slope=0.05",
            "--model.d_model=16",
            "--model.n_layers=1",
            "--model.n_heads=2",
            "--model.d_ff=32",
            "--model.max_seq_len=16",
            "--model.moe.d_hidden=16",
            "--model.moe.n_experts=4",
            "--model.moe.k=2",
            "--train.steps=6",
            "--train.batch_size=8",
            "--train.eval_interval=3",
            "--train.warmup_steps=1",
            "--train.live=off",
            "--train.threads=1",
            f"--out={run}",
        ]
    )
    ckpt = run / "checkpoints" / "step-0000006"
    assert json.loads((ckpt / "run.json").read_text())["task"] == {
        "name": "test-ramp",
        "seq_len": 16,
        "val_sequences": 16,
        "options": {"slope": 0.05},
    }
    evals = [
        json.loads(line)
        for line in (run / "metrics.jsonl").read_text().splitlines()
        if '"eval"' in line
    ]
    assert [e["step"] for e in evals] == [3, 6]
    capsys.readouterr()
    cli.main(["eval", str(ckpt)])  # the saved run config finds the task again by name
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["task"] == "test-ramp"
    assert evaluated["mse"] == pytest.approx(evals[-1]["mse"], rel=1e-5)
