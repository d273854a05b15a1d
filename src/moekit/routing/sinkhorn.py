"""Sinkhorn-balanced routing (BASE layers, Clark et al. 2022 "S-BASE").

Each of the k choices is one balanced assignment: Sinkhorn-Knopp scales exp(logits / tau)
so every token has mass 1 and every expert T / E; tokens then propose to their best expert
in that plan, and each expert accepts its ceil(T / E) best proposals, over at most E passes,
so the hard assignment is balanced too. The next round excludes the experts already taken.
Weights come from the original softmax, so gradients reach the router as in top-k routing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.config import RouterOptions
from moekit.routing.base import Router, renormalize
from moekit.routing.registry import register_router
from moekit.types import Routing


@dataclass(frozen=True)
class SinkhornOptions(RouterOptions):
    """The balancing iterations and how hard the balanced plan is."""

    iters: int = 50
    tau: float = 0.05  # entropic temperature: smaller = closer to a hard balanced plan
    candidates: int | None = None  # restrict each token to its top-n experts by logit

    def __post_init__(self) -> None:
        if not isinstance(self.iters, int) or self.iters < 1:
            raise ValueError(f"router.options.iters={self.iters!r} must be an integer >= 1")
        if not isinstance(self.tau, int | float) or not 0 < self.tau < float("inf"):
            raise ValueError(f"router.options.tau={self.tau!r} must be finite and > 0")
        if self.candidates is not None and (
            not isinstance(self.candidates, int) or self.candidates < 1
        ):
            raise ValueError(
                f"router.options.candidates={self.candidates!r} must be None or an integer >= 1"
            )


def sinkhorn_log(scores_TE: Tensor, iters: int) -> Tensor:
    """Log of the balanced plan: rows sum to 1, columns to T / E (log-domain Sinkhorn)."""
    T, E = scores_TE.shape
    log_col = torch.log(torch.tensor(T / E, dtype=scores_TE.dtype, device=scores_TE.device))
    log_p = scores_TE
    for _ in range(iters):
        log_p = log_p - torch.logsumexp(log_p, dim=0, keepdim=True) + log_col
        log_p = log_p - torch.logsumexp(log_p, dim=1, keepdim=True)
    return log_p


def capacity_assign(log_p_TE: Tensor) -> Tensor:
    """Experts [T]: each expert takes at most ceil(T / E) tokens, best plan scores first.

    Every unassigned token proposes to its best expert that still has room; each expert
    accepts as many proposals as it has room for, highest score first. E passes suffice.
    """
    T, E = log_p_TE.shape
    device = log_p_TE.device
    room_E = torch.full((E,), math.ceil(T / E), dtype=torch.long, device=device)
    choice_T = torch.full((T,), -1, dtype=torch.long, device=device)
    avail_TE = log_p_TE.clone()
    for _ in range(E):
        free_T = choice_T < 0
        propose_T = avail_TE.argmax(-1)
        score_T = avail_TE.gather(1, propose_T[:, None])[:, 0].masked_fill(~free_T, float("-inf"))
        by_score = torch.argsort(score_T, descending=True, stable=True)
        order = by_score[torch.argsort(propose_T[by_score], stable=True)]
        count_E = torch.zeros(E, dtype=torch.long, device=device)
        count_E.scatter_add_(0, propose_T, torch.ones_like(propose_T))
        first_E = torch.cumsum(count_E, 0) - count_E
        rank_sorted = torch.arange(T, device=device) - first_E[propose_T[order]]
        rank_T = torch.empty_like(rank_sorted).scatter_(0, order, rank_sorted)
        accept_T = free_T & (rank_T < room_E[propose_T]) & (score_T > float("-inf"))
        choice_T = torch.where(accept_T, propose_T, choice_T)
        taken_E = torch.zeros(E, dtype=torch.long, device=device)
        taken_E.scatter_add_(0, propose_T, accept_T.long())
        room_E = room_E - taken_E
        avail_TE = avail_TE.masked_fill((room_E <= 0)[None, :], float("-inf"))
    # a token whose allowed experts all filled up keeps its best allowed one, over capacity
    return torch.where(choice_T < 0, log_p_TE.argmax(-1), choice_T)


def balanced_topk(
    logits_TE: Tensor, k: int, iters: int, tau: float, candidates: int | None
) -> Tensor:
    """Experts [T, k] picked round by round from Sinkhorn-balanced plans (no gradient)."""
    scores_TE = logits_TE.detach() / tau
    allowed_TE = torch.ones_like(scores_TE, dtype=torch.bool)
    if candidates is not None and candidates < scores_TE.shape[1]:
        top = scores_TE.topk(candidates, dim=-1).indices
        allowed_TE = torch.zeros_like(allowed_TE).scatter_(1, top, True)
    blocked = torch.finfo(scores_TE.dtype).min / 4  # finite: a fully blocked column stays NaN-free
    picks = []
    for _ in range(k):
        log_p_TE = sinkhorn_log(scores_TE.masked_fill(~allowed_TE, blocked), iters)
        choice_T = capacity_assign(log_p_TE.masked_fill(~allowed_TE, float("-inf")))
        picks.append(choice_T)
        allowed_TE = allowed_TE.scatter(1, choice_T.unsqueeze(1), False)
    return torch.stack(picks, dim=1)


@register_router("sinkhorn", options=SinkhornOptions)
class SinkhornRouter(Router):
    """k balanced assignments per pass; capacity, when set, drops the lowest-probability slots."""

    uses_capacity = True
    batch_invariant = False  # the balance is over every token of the pass

    def select(self, logits_TE: Tensor) -> Routing:
        probs_TE = logits_TE.softmax(dim=-1)
        if logits_TE.shape[0] == 0:
            experts_TK = torch.empty(0, self.k, dtype=torch.long, device=logits_TE.device)
        else:
            o = self.options
            experts_TK = balanced_topk(logits_TE, self.k, o.iters, o.tau, o.candidates)
        weights_TK = probs_TE.gather(1, experts_TK)
        priority_TK = weights_TK.detach()
        if self.rcfg.renormalize:
            weights_TK = renormalize(weights_TK)
        return self.routed(experts_TK, weights_TK, priority_TK, logits_TE, probs_TE)
