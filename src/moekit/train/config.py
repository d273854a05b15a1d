"""`TrainConfig` (optimisation, logging, checkpoints), `ParallelConfig` and `RunConfig`.

`RunConfig` is what `moekit train CONFIG` parses: YAML keys and `--dotted.overrides` map
onto these frozen dataclasses (nested dicts through `moekit.config.from_dict`), and every bad
value raises a ValueError naming its key.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from moekit.config import build_nested, from_dict
from moekit.model.config import ModelConfig
from moekit.model.task import TaskConfig
from moekit.train.step import Precision

PRECISIONS = ("auto", *(p.value for p in Precision))  # torch names (bfloat16, ...) read as these
LIVE_MODES = ("auto", "rich", "plain", "off")
CHECKPOINTING = ("none", "experts", "blocks")  # train.activation_checkpointing


@dataclass(frozen=True)
class HealthConfig:
    """When an expert counts as dead and an MoE layer as collapsed (`moekit.train.health`)."""

    dead_load: float = 0.1  # starved: under this fraction of the uniform share 1/E of the slots
    collapse_entropy: float = 0.5  # collapsing: expert-load entropy / log(E) under this
    patience: int = 100  # consecutive steps starved (collapsing) before dead (collapsed)

    def __post_init__(self) -> None:
        if not 0 < self.dead_load <= 1:
            raise ValueError(f"train.health.dead_load={self.dead_load} must be in (0, 1]")
        if not 0 <= self.collapse_entropy <= 1:
            raise ValueError(
                f"train.health.collapse_entropy={self.collapse_entropy} must be in [0, 1]"
            )
        if self.patience < 1:
            raise ValueError(f"train.health.patience={self.patience} must be >= 1")


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser, schedule, precision, evaluation, logging and checkpointing."""

    steps: int = 1000
    batch_size: int = 32  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimiser step
    lr: float = 3e-3  # peak learning rate of the non-MoE parameters
    router_lr: float | None = None  # None = lr
    expert_lr: float | None = None  # None = lr
    warmup_steps: int = 50  # linear warmup from 0, then cosine decay
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of each group's peak lr
    weight_decay: float = 0.1  # AdamW decay; never on norms, biases or the router bias
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    precision: str = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU; fp16 uses a scaler
    device: str = "auto"  # auto = cuda when available
    eval_interval: int = 100  # steps between evaluations (and at the end)
    eval_batch_size: int = 64
    log_interval: int = 10  # steps between host syncs that write JSONL records
    plot_interval: int = 0  # steps between dashboard redraws; 0 = at the end only
    ckpt_interval: int | None = None  # steps between checkpoints; None = eval_interval
    keep_best: int = 2  # checkpoints kept by lowest validation metric
    keep_last: int = 2  # most recent checkpoints kept
    live: str = "auto"  # auto = rich view on a TTY, plain lines otherwise
    threads: int | None = None  # CPU threads for torch; 1 is fastest for tiny models / busy CPUs
    # none | experts (recompute each MoE layer's expert MLPs) | blocks (recompute whole blocks)
    activation_checkpointing: str = "none"
    compile: bool = False  # torch.compile the training forward (the whole model)
    prefetch: int = 2  # CUDA: steps of batches built ahead on a thread, in pinned memory
    time_budget_s: float | None = None  # stop once this many seconds were spent training
    health: HealthConfig = field(default_factory=HealthConfig)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "eval_batch_size", "log_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name}={getattr(self, name)} must be >= 1")
        for name in ("warmup_steps", "plot_interval", "keep_best", "keep_last"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name}={getattr(self, name)} must be >= 0")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"train.threads={self.threads} must be >= 1 (or null)")
        if self.eval_interval < 1:
            raise ValueError(f"train.eval_interval={self.eval_interval} must be >= 1")
        if self.ckpt_interval is not None and self.ckpt_interval < 1:
            raise ValueError(f"train.ckpt_interval={self.ckpt_interval} must be >= 1")
        for name in ("lr", "router_lr", "expert_lr"):
            value = getattr(self, name)
            if value is not None and not 0 < value < 10:
                raise ValueError(f"train.{name}={value} must be in (0, 10)")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"train.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"train.{name}={getattr(self, name)} must be in [0, 1)")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("train.weight_decay and train.grad_clip must be >= 0")
        if self.precision != "auto":
            try:
                precision = Precision.parse(self.precision).value
            except ValueError:
                raise ValueError(
                    f"train.precision={self.precision!r} is not one of {PRECISIONS} "
                    "(or bfloat16, float16, float32)"
                ) from None
            object.__setattr__(self, "precision", precision)
        if self.live not in LIVE_MODES:
            raise ValueError(f"train.live={self.live!r} is not one of {LIVE_MODES}")
        if self.device != "auto" and not self.device.startswith(("cpu", "cuda")):
            raise ValueError(f"train.device={self.device!r} must be auto, cpu or cuda[:N]")
        if self.activation_checkpointing not in CHECKPOINTING:
            raise ValueError(
                f"train.activation_checkpointing={self.activation_checkpointing!r} "
                f"is not one of {CHECKPOINTING}"
            )
        if self.prefetch < 0:
            raise ValueError(f"train.prefetch={self.prefetch} must be >= 0")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ValueError(f"train.time_budget_s={self.time_budget_s} must be > 0 (or null)")
        build_nested(self, "train.")

    @property
    def checkpoint_every(self) -> int:
        return self.ckpt_interval or self.eval_interval


@dataclass(frozen=True)
class ParallelConfig:
    """Multi-process training, launched with torchrun."""

    ep: int = 1  # expert parallelism: experts split over this many ranks
    dp: int = 1  # data parallelism around it: world size = ep * dp

    def __post_init__(self) -> None:
        if self.ep < 1:
            raise ValueError(f"parallel.ep={self.ep} must be >= 1")
        if self.dp < 1:
            raise ValueError(f"parallel.dp={self.dp} must be >= 1")


@dataclass(frozen=True)
class RunConfig:
    """One training run. The model's input/output sizes are filled from the task."""

    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    seed: int = 0
    out: str = "runs/latest"  # run directory: logs, plots, checkpoints/

    def __post_init__(self) -> None:
        build_nested(self)  # sections given as dicts; an error names the section
        if self.parallel.ep > 1 and self.train.activation_checkpointing != "none":
            raise ValueError(
                "train.activation_checkpointing needs parallel.ep=1 (a recompute would repeat "
                "the experts' all-to-all)"
            )
        if self.model.max_seq_len < self.task.seq_len:
            raise ValueError(
                f"model.max_seq_len={self.model.max_seq_len} must be >= "
                f"task.seq_len={self.task.seq_len}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """A run config from YAML or run.json; unknown keys are named in a ValueError."""
        return from_dict(cls, data, "run config key(s)")
