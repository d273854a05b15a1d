"""What a training step and an evaluation report about the model and its routing."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor

from moekit.model import ModelOutput, Transformer
from moekit.model.task import Batch, Task
from moekit.routing.losses import LOSS_NAMES
from moekit.train.step import StepLoss


def model_loss(out: ModelOutput, batch: Batch) -> StepLoss:
    """A transformer output's loss terms for `TrainStep`, with its routing metrics.

    Metrics: unweighted aux parts (mean over MoE layers), and per MoE layer (keyed by its
    index) the expert load [E] and the dropped fraction.
    """
    metrics: dict[str, Any] = {}
    moe = {str(i): info for i, info in enumerate(out.layers) if info is not None}
    if moe:
        for name in LOSS_NAMES:
            metrics[name] = torch.stack([m.metrics[name] for m in moe.values()]).mean()
        metrics["expert_load"] = {i: m.metrics["expert_load"] for i, m in moe.items()}
        metrics["dropped_fraction"] = {i: m.metrics["dropped_fraction"] for i, m in moe.items()}
    return StepLoss(out.task_loss, out.aux_loss, metrics=metrics)  # type: ignore[arg-type]


def routing_counts(out: ModelOutput, batch: Batch, n_categories: int) -> dict[str, Tensor]:
    """Per MoE layer: [C, E] counts of token-slots of input category c sent to expert e."""
    counts = {}
    cats_T = batch.category.reshape(-1)
    for i, info in enumerate(out.layers):
        if info is None:
            continue
        experts_TK = info.routing.experts
        E = info.metrics["expert_load"].shape[0]
        valid_TK = (experts_TK >= 0).float()
        flat_TK = cats_T[:, None] * E + experts_TK.clamp_min(0)  # category-major cell index
        c = torch.zeros(n_categories * E, device=experts_TK.device)
        c.scatter_add_(0, flat_TK.reshape(-1), valid_TK.reshape(-1))
        counts[str(i)] = c.view(n_categories, E)
    return counts


@torch.no_grad()
def evaluate_model(
    model: Transformer,
    task: Task,
    batches: list[Batch],
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> dict[str, Any]:
    """Mean validation loss and task metrics over `batches`, plus per-layer routing counts."""
    was_training = model.training
    model.eval()
    sums: dict[str, Tensor] = {}
    counts: dict[str, Tensor] = {}
    n = 0
    for batch in batches:
        with autocast():
            out = model(batch.x, batch.y)
        m = {"val_loss": out.task_loss, **task.metrics(out.out, batch, out.task_loss)}
        B = batch.x.shape[0]
        for key, value in m.items():
            sums[key] = sums.get(key, 0) + value.float() * B
        for layer, c in routing_counts(out, batch, len(task.categories)).items():
            counts[layer] = counts.get(layer, 0) + c
        n += B
    model.train(was_training)
    return _sync_eval_record(sums, counts, n)


def _sync_eval_record(sums: dict[str, Tensor], counts: dict[str, Tensor], n: int) -> dict:
    """Evaluation results to Python numbers. NOTE: host sync, once per evaluation."""
    record: dict[str, Any] = {k: float(v / n) for k, v in sums.items()}
    record["routing"] = {k: v.cpu().tolist() for k, v in counts.items()}
    return record
