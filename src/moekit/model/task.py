"""What a model is trained on: deterministic batches, a loss, a metric and input categories.

Batches are a pure function of (seed, split, step, micro-step), so a resumed run sees the
same data as an uninterrupted one and no data-loader state needs saving. Tasks are found by
name in a registry: `@register_task("name", options=MyOptions)` on a `Task` subclass.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from moekit.config import MIGRATIONS, from_dict

_TASKS: dict[str, type[Task]] = {}
_FLAT_OPTIONS = ("noise", "max_bytes", "val_every")  # task options of the older flat layout


@dataclass(frozen=True)
class NoOptions:
    """The options of a task with nothing to configure beyond `TaskConfig`."""


@dataclass
class NoiseOptions:
    """The options of a series task: observation noise on series of about unit scale."""

    noise: float = 0.01  # observation noise std

    def __post_init__(self) -> None:
        if not 0.0 <= self.noise < 1.0:
            raise ValueError(f"task.options.noise={self.noise} must be in [0, 1)")


def register_task(name: str, options: type = NoOptions) -> Callable[[type[Task]], type[Task]]:
    """Class decorator adding a task under `name`; `options` is its own config dataclass."""
    if not dataclasses.is_dataclass(options):
        raise TypeError(f"options of task {name!r} must be a dataclass, got {options!r}")

    def wrap(cls: type[Task]) -> type[Task]:
        if name in _TASKS and _TASKS[name] is not cls:
            raise ValueError(f"task {name!r} is already registered by {_TASKS[name].__qualname__}")
        cls.name, cls.Options = name, options
        _TASKS[name] = cls
        return cls

    return wrap


def available_tasks() -> tuple[str, ...]:
    return tuple(sorted(_TASKS))


def task_class(name: str) -> type[Task]:
    """The task registered as `name`; a ValueError naming task.name otherwise."""
    if name not in _TASKS:
        raise ValueError(f"task.name={name!r} is not one of {available_tasks()}")
    return _TASKS[name]


def _options_of(name: str, options: dict[str, Any]) -> Any:
    """The named task's options dataclass built from a dict, naming any key it lacks."""
    cls = task_class(name).Options
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        allowed = ", ".join(sorted(known)) or "none"
        raise ValueError(
            f"task.options.{unknown[0]} is not an option of task {name!r} (options: {allowed})"
        )
    return cls(**options)


@dataclass(frozen=True)
class TaskConfig:
    """Which task, the sizes every task has, and the named task's own `options`."""

    name: str = "signals"
    seq_len: int = 64  # positions per training sequence
    val_sequences: int = 128  # fixed validation sequences
    options: dict[str, Any] = field(default_factory=dict)  # fields of the task's Options class

    def __post_init__(self) -> None:
        for name in ("seq_len", "val_sequences"):
            if getattr(self, name) < 1:
                raise ValueError(f"task.{name}={getattr(self, name)} must be >= 1")
        if dataclasses.is_dataclass(self.options) and not isinstance(self.options, type):
            object.__setattr__(self, "options", dataclasses.asdict(self.options))
        if not isinstance(self.options, dict):
            raise ValueError(f"task.options={self.options!r} must be a mapping of option values")
        _options_of(self.name, self.options)  # options left out take the task's defaults

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskConfig:
        """A config from a dict, also in the flat layout of older runs (options beside `name`)."""
        return from_dict(cls, data, "task key(s)")


def _migrate_flat_options(data: dict[str, Any]) -> dict[str, Any]:
    """Older runs kept task options beside `name`; the flat layout ignored unused ones."""
    flat = {k: data.pop(k) for k in _FLAT_OPTIONS if k in data}
    if flat:
        name = data.get("name", TaskConfig.name)
        used = {f.name for f in dataclasses.fields(task_class(name).Options)}
        data["options"] = {
            **{k: v for k, v in flat.items() if k in used},
            **data.get("options", {}),
        }
    return data


MIGRATIONS[TaskConfig] = (_migrate_flat_options,)


@dataclass
class Batch:
    """x: inputs [B, S] tokens or [B, S, d_in]; y: targets; category: [B, S] int64."""

    x: Tensor
    y: Tensor
    category: Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.x.to(device), self.y.to(device), self.category.to(device))


def pearson(pred_BSD: Tensor, true_BSD: Tensor) -> Tensor:
    """Pearson correlation of forecast and truth over all positions, one per output dimension,
    averaged over the dimensions: a scale-free score beside MSE (1 is perfect)."""
    p_ND = pred_BSD.detach().float().reshape(-1, pred_BSD.shape[-1])
    t_ND = true_BSD.detach().float().reshape(-1, true_BSD.shape[-1])
    p_ND, t_ND = p_ND - p_ND.mean(0), t_ND - t_ND.mean(0)
    cov_D = (p_ND * t_ND).sum(0)
    scale_D = (p_ND.square().sum(0) * t_ND.square().sum(0)).sqrt().clamp_min(1e-12)
    return (cov_D / scale_D).mean()


def generator(seed: int, *parts: Any) -> torch.Generator:
    """A CPU generator seeded by a hash of (seed, parts): independent streams per batch."""
    digest = hashlib.blake2b(repr((seed, *parts)).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


class Task:
    """Base class: subclasses set the class attributes and implement `make_batch`.

    `name` and `Options` are set by `register_task`; `self.options` is this run's instance.
    """

    name = ""
    Options: type = NoOptions
    categories: tuple[str, ...] = ()
    metric = "val_loss"  # name of the headline metric (lower is better)

    def __init__(self, cfg: TaskConfig, seed: int = 0) -> None:
        self.cfg, self.seed = cfg, seed
        self.options = self.Options(**cfg.options)

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


def build_task(cfg: TaskConfig, seed: int = 0) -> Task:
    """The task registered under cfg.name."""
    return task_class(cfg.name)(cfg, seed)
