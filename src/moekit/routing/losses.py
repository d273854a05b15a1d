"""Auxiliary losses and routing metrics, in one place so every router reports the same ones.

All inputs are tensors from a `Routing` and the kept-slot mask; nothing here syncs with the
host, so metrics stay tensors until a logger decides to read them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.config import RouterConfig
from moekit.types import Routing

LOSS_NAMES = ("load_balance", "z_loss", "entropy", "seq_balance")


def _balance(experts_BTK: Tensor, probs_BTE: Tensor) -> Tensor:
    """Switch Transformer eq. 4, E * sum_e f_e * P_e (1.0 when balanced), per group B -> [B].

    f_e: fraction of the group's chosen token-slots (pre-capacity) that went to expert e;
    P_e: the group's mean router probability for e. Empty slots (-1) count for nothing.
    """
    B, _, E = probs_BTE.shape
    counts_BE = torch.zeros(B, E, dtype=probs_BTE.dtype, device=probs_BTE.device)
    valid = (experts_BTK >= 0).to(probs_BTE.dtype).reshape(B, -1)
    counts_BE.scatter_add_(1, experts_BTK.clamp_min(0).reshape(B, -1), valid)
    f_BE = counts_BE / counts_BE.sum(-1, keepdim=True).clamp_min(1.0)
    return E * (f_BE * probs_BTE.mean(1)).sum(-1)


def router_losses(routing: Routing, seq_shape: tuple[int, ...] = ()) -> dict[str, Tensor]:
    """Unweighted loss components. `seq_shape` is x's leading shape, e.g. (B, S)."""
    logits_TE, probs_TE, experts_TK = routing.logits, routing.probs, routing.experts
    T = logits_TE.shape[0]
    if T == 0:
        zero = logits_TE.sum()  # a zero that keeps dtype, device and the graph
        return dict.fromkeys(LOSS_NAMES, zero)
    log_probs = probs_TE.clamp_min(torch.finfo(probs_TE.dtype).tiny).log()
    losses = {
        "load_balance": _balance(experts_TK[None], probs_TE[None])[0],
        "z_loss": torch.logsumexp(logits_TE, dim=-1).square().mean(),  # ST-MoE eq. 5
        "entropy": -(probs_TE * log_probs).sum(-1).mean(),
    }
    if len(seq_shape) >= 2:  # DeepSeek-V3 sequence-wise balance: the Switch loss per sequence
        B = T // seq_shape[-1]
        per_seq_B = _balance(
            experts_TK.view(B, -1, experts_TK.shape[-1]), probs_TE.view(B, -1, probs_TE.shape[-1])
        )
        losses["seq_balance"] = per_seq_B.mean()
    else:
        losses["seq_balance"] = losses["load_balance"]
    return losses


def weighted_aux_loss(losses: dict[str, Tensor], cfg: RouterConfig) -> Tensor:
    return (
        cfg.load_balance_weight * losses["load_balance"]
        + cfg.z_loss_weight * losses["z_loss"]
        + cfg.entropy_weight * losses["entropy"]
        + cfg.seq_balance_weight * losses["seq_balance"]
    )


def training_loss(
    task_loss: Tensor, aux_loss: Tensor, aux_weight: float, penalty: Tensor | None = None
) -> Tensor:
    """The loss a model trains on: task + aux_weight * the MoE layers' aux loss (+ penalty).

    The one place it is composed: `ModelOutput.loss` and `TrainStep` both call it.
    """
    total = task_loss + aux_weight * aux_loss
    return total if penalty is None else total + penalty


def routing_metrics(
    routing: Routing, kept_TK: Tensor, n_experts: int, losses: dict[str, Tensor]
) -> dict[str, Tensor]:
    """expert_load [E] (fractions of kept token-slots), dropped / unrouted fractions, losses."""
    experts_TK = routing.experts
    valid_TK = experts_TK >= 0
    kept_load_E = torch.zeros(n_experts, dtype=torch.float32, device=experts_TK.device)
    kept_load_E.scatter_add_(0, experts_TK.clamp_min(0).reshape(-1), kept_TK.reshape(-1).float())
    n_kept = kept_load_E.sum()
    n_valid = valid_TK.sum().float()
    expert_load = kept_load_E / n_kept.clamp_min(1.0)
    metrics = {
        "expert_load": expert_load,
        "load_max_over_mean": expert_load.max() * n_experts if n_experts else n_kept,
        "dropped_fraction": 1.0 - n_kept / n_valid.clamp_min(1.0) if valid_TK.numel() else n_kept,
        "unrouted_fraction": (~kept_TK.any(-1)).float().mean() if kept_TK.numel() else n_kept,
        "router_entropy": losses["entropy"].detach().float(),
        "router_z": losses["z_loss"].detach().float(),
    }
    metrics.update({k: v.detach().float() for k, v in losses.items()})
    return metrics
