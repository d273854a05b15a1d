"""What a training task provides: deterministic batches, a metric and input categories.

Batches are a pure function of (seed, split, step, micro-step), so a resumed run sees the
same data as an uninterrupted one and no data-loader state needs saving.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

TASKS = ("signals", "trajectories3d", "text")


@dataclass
class TaskConfig:
    """Which task and its data options (options a task does not use are ignored)."""

    name: str = "signals"
    seq_len: int = 64  # positions per training sequence
    noise: float = 0.01  # signals / trajectories: observation noise std (unit-scale data)
    max_bytes: int = 4_000_000  # text: cap on corpus bytes read (train + val)
    val_every: int = 20  # text: every Nth stdlib file (by sorted path) goes to validation
    val_sequences: int = 128  # fixed validation sequences

    def __post_init__(self) -> None:
        if self.name not in TASKS:
            raise ValueError(f"task.name={self.name!r} is not one of {TASKS}")
        for name in ("seq_len", "max_bytes", "val_sequences"):
            if getattr(self, name) < 1:
                raise ValueError(f"task.{name}={getattr(self, name)} must be >= 1")
        if self.val_every < 2:
            raise ValueError(f"task.val_every={self.val_every} must be >= 2")
        if not 0.0 <= self.noise < 1.0:
            raise ValueError(f"task.noise={self.noise} must be in [0, 1)")


@dataclass
class Batch:
    """x: inputs [B, S] tokens or [B, S, d_in]; y: targets; category: [B, S] int64."""

    x: Tensor
    y: Tensor
    category: Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.x.to(device), self.y.to(device), self.category.to(device))


def generator(seed: int, *parts: Any) -> torch.Generator:
    """A CPU generator seeded by a hash of (seed, parts): independent streams per batch."""
    digest = hashlib.blake2b(repr((seed, *parts)).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


class Task:
    """Base class: subclasses set the class attributes and implement `make_batch`."""

    name = ""
    categories: tuple[str, ...] = ()
    metric = "val_loss"  # name of the headline metric (lower is better)

    def __init__(self, cfg: TaskConfig, seed: int = 0) -> None:
        self.cfg, self.seed = cfg, seed

    def model_fields(self) -> dict[str, int | None]:
        """ModelConfig fields the task fixes: vocab_size, or d_in and d_out."""
        raise NotImplementedError

    def make_batch(self, gen: torch.Generator, batch_size: int, split: str) -> Batch:
        raise NotImplementedError

    def train_batch(self, step: int, micro: int, batch_size: int) -> Batch:
        """The batch for (step, micro-step); the same on every run with this seed."""
        return self.make_batch(generator(self.seed, "train", step, micro), batch_size, "train")

    def val_batches(self, batch_size: int) -> list[Batch]:
        """Fixed validation set: `val_sequences` sequences in batches."""
        n, out = self.cfg.val_sequences, []
        for i in range(0, n, batch_size):
            gen = generator(self.seed, "val", i)
            out.append(self.make_batch(gen, min(batch_size, n - i), "val"))
        return out

    def metrics(self, out: Tensor, batch: Batch, task_loss: Tensor) -> dict[str, Tensor]:
        """Per-batch metrics (device tensors); the headline one is named `self.metric`."""
        return {}

    def plots(self, model: torch.nn.Module, out_dir: Path) -> list[Path]:
        """Task-specific figures written at the end of training."""
        return []


def build_task(cfg: TaskConfig, seed: int = 0) -> Task:
    """The task named by cfg.name."""
    if cfg.name == "signals":
        from moekit.tasks.signals import SignalsTask

        return SignalsTask(cfg, seed)
    if cfg.name == "trajectories3d":
        from moekit.tasks.trajectories3d import TrajectoriesTask

        return TrajectoriesTask(cfg, seed)
    from moekit.tasks.text import TextTask

    return TextTask(cfg, seed)
