"""AdamW parameter groups (router / experts / rest, decay or not) and the LR schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from moekit.train.config import TrainConfig

GROUPS = ("router", "experts", "rest")


def _group_of(name: str) -> str:
    if ".router." in name:
        return "router"
    if ".ffn.experts." in name or ".ffn.shared." in name or ".ffn.fallback." in name:
        return "experts"
    return "rest"


def _decays(name: str, p: nn.Parameter) -> bool:
    """Weight decay on matrices only: never on norms, biases (incl. stacked expert biases)."""
    leaf = name.rsplit(".", 1)[-1]
    return p.dim() >= 2 and leaf not in ("b1", "b2", "bias") and "norm" not in name


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Up to six groups: {router, experts, rest} x {decay, no decay}, each with its peak lr."""
    peak = {
        "router": cfg.router_lr or cfg.lr,
        "experts": cfg.expert_lr or cfg.lr,
        "rest": cfg.lr,
    }
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            buckets.setdefault((_group_of(name), _decays(name, p)), []).append(p)
    return [
        {
            "params": params,
            "name": group,
            "lr": peak[group],
            "peak_lr": peak[group],
            "weight_decay": cfg.weight_decay if decay else 0.0,
        }
        for (group, decay), params in sorted(buckets.items())
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over `param_groups`; fused into one kernel per group when every weight is on CUDA.

    Elsewhere it is the plain loop, so CPU runs keep their numbers.
    """
    groups = param_groups(model, cfg)
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(p.is_cuda and type(p.data) is torch.Tensor for p in params)
    extra = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, betas=(cfg.beta1, cfg.beta2), eps=1e-8, **extra)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to 1 over warmup_steps, then cosine decay to min_lr_ratio at `steps`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine


def set_lr(optimizer: torch.optim.Optimizer, step: int, cfg: TrainConfig) -> dict[str, float]:
    """Set every group's lr for `step` (a pure function of step); return lr per group name."""
    factor = lr_factor(step, cfg)
    lrs = {}
    for group in optimizer.param_groups:
        group["lr"] = group["peak_lr"] * factor
        lrs[group["name"]] = group["lr"]
    return lrs
