"""One training step, written once: forward, aux loss, precision, accumulation, clipping, metrics.

The trainer, `moekit.System`, the layer demo and the finance forecasters all call `TrainStep`;
each supplies only what differs: how to run its model on a micro-batch (`forward`, under
autocast) and how to turn the output into loss terms (`loss`, outside autocast, float32).

    step = TrainStep(model, StepConfig(precision="bf16", max_grad_norm=1.0))
    record = step(optimizer, micro_batches, forward, loss)  # device tensors, no host sync
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from moekit.routing.losses import training_loss


class Precision(StrEnum):
    """Precision of the forward pass; fp16 also scales the loss (its gradients underflow)."""

    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"

    @classmethod
    def parse(cls, value: str | None, name: str = "precision") -> Precision:
        """'fp32' | 'bf16' | 'fp16', or torch's names for them; None is fp32."""
        if value is None:
            return cls.FP32
        key = _TORCH_NAMES.get(value, value) if isinstance(value, str) else value
        try:
            return cls(key)
        except ValueError:
            accepted = ", ".join([*cls, *_TORCH_NAMES])
            raise ValueError(f"{name}={value!r} is not one of {accepted}") from None

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype; None for fp32 (no autocast)."""
        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.value]


# torch's dtype names map onto the short ones, so either spelling configures the same thing
_TORCH_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def resolve_precision(value: str, device: torch.device) -> Precision:
    """`value`, where 'auto' means bf16 on CUDA and fp32 elsewhere."""
    if value == "auto":
        return Precision.BF16 if device.type == "cuda" else Precision.FP32
    return Precision.parse(value)


@dataclass(frozen=True)
class StepConfig:
    """What a training step does besides the forward and the loss."""

    precision: Precision | str | None = Precision.FP32
    max_grad_norm: float | None = None  # clip to this global norm; inf = measure only; None = off
    aux_weight: float = 1.0  # multiplies StepLoss.aux_loss in the loss

    def __post_init__(self) -> None:
        object.__setattr__(self, "precision", Precision.parse(self.precision))
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm={self.max_grad_norm} must be > 0 (or None)")
        if not self.aux_weight >= 0:
            raise ValueError(f"aux_weight={self.aux_weight} must be >= 0")


@dataclass
class StepLoss:
    """One micro-batch's loss terms (scalars): loss = task + aux_weight * aux (+ penalty)."""

    task_loss: Tensor
    aux_loss: Tensor  # the MoE layers' weighted aux losses; zeros for a dense model
    penalty: Tensor | None = None  # a caller's extra term, e.g. a router prior
    metrics: dict[str, Any] = field(default_factory=dict)  # device tensors, nested dicts allowed


class Gradients(Protocol):
    """How gradients cross processes: `moekit.train.parallelism` implements it."""

    def no_sync(self, last: bool) -> contextlib.AbstractContextManager: ...

    def reduce_gradients_(self, model: nn.Module) -> None: ...

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> Tensor: ...


class LocalGradients:
    """One process: nothing to exchange, clipping by the local gradients' norm."""

    def no_sync(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def reduce_gradients_(self, model: nn.Module) -> None:
        return None

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> Tensor:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)


Forward = Callable[[Any], Any]  # micro-batch -> model output
LossFn = Callable[[Any, Any], StepLoss]  # (model output, micro-batch) -> loss terms


class TrainStep:
    """Owns the precision (autocast, gradient scaler) and runs optimiser steps on `model`."""

    def __init__(
        self, model: nn.Module, cfg: StepConfig | None = None, grads: Gradients | None = None
    ) -> None:
        self.model, self.cfg = model, cfg or StepConfig()
        self.grads = grads or LocalGradients()
        self.device_type = next(model.parameters()).device.type
        fp16 = self.cfg.precision == Precision.FP16
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=fp16)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward pass's precision context (also for evaluation)."""
        dtype = self.cfg.precision.dtype  # type: ignore[union-attr]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=dtype)

    def __call__(
        self,
        optimizer: torch.optim.Optimizer,
        micro_batches: Sequence,
        forward: Forward,
        loss: LossFn,
    ) -> dict[str, Any]:
        """Backward over the mean of the micro-batches' losses, then one optimiser step.

        Returns detached device tensors: loss, task_loss, aux_loss, the loss's metrics (each
        averaged over micro-batches) and grad_norm when clipping is configured. Gradients stay
        readable until the next call, which clears them first.
        """
        n = len(micro_batches)
        if n == 0:
            raise ValueError("micro_batches is empty: a step needs at least one micro-batch")
        self.model.train()
        optimizer.zero_grad(set_to_none=True)
        parts = []
        for i, batch in enumerate(micro_batches):
            with self.grads.no_sync(last=i == n - 1):
                with self.autocast():
                    out = forward(batch)
                terms = loss(out, batch)
                total = training_loss(
                    terms.task_loss, terms.aux_loss, self.cfg.aux_weight, terms.penalty
                )
                self.scaler.scale(total / n).backward()
            parts.append(
                {
                    "loss": total.detach(),
                    "task_loss": terms.task_loss.detach(),
                    "aux_loss": terms.aux_loss.detach(),
                    **terms.metrics,
                }
            )
        self.grads.reduce_gradients_(self.model)
        for hook in optimizer_step_hooks(self.model):  # modules swapped after init included
            hook()
        self.scaler.unscale_(optimizer)
        record = mean_metrics(parts)
        if self.cfg.max_grad_norm is not None:
            record["grad_norm"] = self.grads.clip_grad_norm_(self.model, self.cfg.max_grad_norm)
        self.scaler.step(optimizer)
        self.scaler.update()
        return record


def optimizer_step_hooks(model: nn.Module) -> list[Callable[[], None]]:
    """Each submodule's `before_optimizer_step`: state it updates once per optimiser step, after
    every micro-batch's forward and backward (the sigmoid router's balance bias), so gradient
    accumulation and activation recompute count each token once (torchtitan: optimizer pre-hook).
    """
    hooks = (getattr(m, "before_optimizer_step", None) for m in model.modules())
    return [hook for hook in hooks if callable(hook)]


def mean_metrics(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Average micro-batch metrics (nested dicts of tensors)."""
    if len(parts) == 1:
        return parts[0]
    out: dict[str, Any] = {}
    for key, value in parts[0].items():
        if isinstance(value, dict):
            out[key] = mean_metrics([p[key] for p in parts])
        else:
            out[key] = sum(p[key] for p in parts) / len(parts)
    return out
