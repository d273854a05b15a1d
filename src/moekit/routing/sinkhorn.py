"""Sinkhorn-balanced routing (BASE layers, Clark et al. 2022 "S-BASE").

Each of the k choices is one balanced assignment: Sinkhorn-Knopp scales exp(logits / tau)
so every token has mass 1 and every expert T / E, the token takes its best expert in that
plan, and the next round excludes the experts already taken. Weights come from the
original softmax, so gradients reach the router as in top-k routing.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.routing import register_router
from moekit.routing.base import Router, Routing, renormalize


def sinkhorn_log(scores_TE: Tensor, iters: int) -> Tensor:
    """Log of the balanced plan: rows sum to 1, columns to T / E (log-domain Sinkhorn)."""
    T, E = scores_TE.shape
    log_col = torch.log(torch.tensor(T / E, dtype=scores_TE.dtype, device=scores_TE.device))
    log_p = scores_TE
    for _ in range(iters):
        log_p = log_p - torch.logsumexp(log_p, dim=0, keepdim=True) + log_col
        log_p = log_p - torch.logsumexp(log_p, dim=1, keepdim=True)
    return log_p


def balanced_topk(
    logits_TE: Tensor, k: int, iters: int, tau: float, candidates: int | None
) -> Tensor:
    """Experts [T, k] picked round by round from Sinkhorn-balanced plans (no gradient)."""
    scores_TE = logits_TE.detach() / tau
    if candidates is not None and candidates < scores_TE.shape[1]:
        top = scores_TE.topk(candidates, dim=-1).indices
        allowed = torch.zeros_like(scores_TE, dtype=torch.bool).scatter_(1, top, True)
        scores_TE = scores_TE.masked_fill(~allowed, -1e9 / tau)
    picks = []
    for _ in range(k):
        choice_T = sinkhorn_log(scores_TE, iters).argmax(dim=-1)
        picks.append(choice_T)
        scores_TE = scores_TE.scatter(1, choice_T.unsqueeze(1), float("-inf"))
    return torch.stack(picks, dim=1)


@register_router("sinkhorn")
class SinkhornRouter(Router):
    def select(self, logits_TE: Tensor) -> Routing:
        probs_TE = logits_TE.softmax(dim=-1)
        if logits_TE.shape[0] == 0:
            experts_TK = torch.empty(0, self.k, dtype=torch.long, device=logits_TE.device)
        else:
            r = self.rcfg
            experts_TK = balanced_topk(
                logits_TE, self.k, r.sinkhorn_iters, r.sinkhorn_tau, r.sinkhorn_candidates
            )
        weights_TK = probs_TE.gather(1, experts_TK)
        priority_TK = weights_TK.detach()
        if self.rcfg.renormalize and self.k > 1:
            weights_TK = renormalize(weights_TK)
        return Routing(
            experts=experts_TK,
            weights=weights_TK * self.rcfg.scaling_factor,
            priority=priority_TK,
            logits=logits_TE,
            probs=probs_TE,
        )
