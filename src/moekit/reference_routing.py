"""Oracles of the built-in routers: per-token loops sharing no code with `moekit.routing`.

Each is a router class's `reference`: (router, x_TD [T, D]) -> Routing, and
`moekit.reference.moe_forward` calls it through the router's class, never by name. Logits
are computed one token at a time in router precision and divided by the temperature; no
noise, and no buffer updates (the sigmoid bias stays as it is).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from moekit.routing.attention import AttentionRouter
from moekit.routing.base import router_dtype
from moekit.routing.expert_choice import ExpertChoiceRouter
from moekit.routing.sigmoid import SigmoidRouter
from moekit.routing.sinkhorn import SinkhornRouter
from moekit.routing.topk import TopKRouter
from moekit.types import Routing

if TYPE_CHECKING:
    from moekit.routing.base import Router


def top(values: list[float], n: int) -> list[int]:
    """Indices of the n largest values, best first (ties: lower index first)."""
    return sorted(range(len(values)), key=lambda i: (-values[i], i))[:n]


def linear_logits(router: Router, x_TD: Tensor) -> Tensor:
    """Logits [T, E]: w_e . x_t per token in router precision, over the temperature."""
    dtype = router_dtype(x_TD.dtype)
    w = router.weight.to(dtype)
    T, E = x_TD.shape[0], router.n_experts
    logits = (
        torch.stack([w @ x_TD[t].to(dtype) for t in range(T)])
        if T
        else x_TD.new_zeros(0, E, dtype=dtype)
    )
    return logits / float(router.live("temperature"))  # the live value when scheduled


def _attention_scores(router: AttentionRouter, x_t: Tensor) -> Tensor:
    """Attention router scores [E] of one token: mean over heads h of q_h . k_{h,e} / sqrt(A)."""
    N, A = router.n_heads, router.head_dim
    scores = []
    for e in range(router.n_experts):
        total = x_t.new_zeros(())
        for h in range(N):
            rows = slice(h * A, (h + 1) * A)
            q = router.query[rows].to(x_t.dtype) @ x_t
            k = router.key[rows].to(x_t.dtype) @ router.weight[e].to(x_t.dtype)
            total = total + (q * k).sum() / math.sqrt(A)
        scores.append(total / N)
    return torch.stack(scores)


def _allowed_groups(scores: list[float], n_groups: int, topk_groups: int) -> set[int]:
    """Experts inside the token's best groups (group score = sum of its top-2 scores)."""
    size = len(scores) // n_groups
    group_scores = []
    for g in range(n_groups):
        members = sorted(scores[g * size : (g + 1) * size], reverse=True)
        group_scores.append(sum(members[: min(2, size)]))
    allowed = set()
    for g in top(group_scores, topk_groups):
        allowed.update(range(g * size, (g + 1) * size))
    return allowed


def _allowed_constellations(
    scores: list[float], groups: list[list[int]], topk_groups: int
) -> set[int]:
    """Experts inside the token's best constellations (score = sum of its top-2 members)."""
    group_scores = [sum(sorted((scores[e] for e in g), reverse=True)[:2]) for g in groups]
    allowed = set()
    for g in top(group_scores, topk_groups):
        allowed.update(groups[g])
    return allowed


def _token_choice(
    router: Router, logits: Tensor, score: Callable[[Tensor], Tensor], bias: list[float]
) -> tuple[Tensor, Tensor, Tensor]:
    """Each token takes its k best experts by score + bias inside its allowed groups.

    Returns experts [T, k], weights [T, k] (from the unbiased scores) and priorities [T, k].
    """
    r, k = router.rcfg, router.k
    T = logits.shape[0]
    weights = logits.new_zeros(T, k)
    priority = logits.new_zeros(T, k)
    chosen = []
    for t in range(T):
        scores = score(logits[t])
        select = [s + b for s, b in zip(scores.detach().tolist(), bias, strict=True)]
        if r.constellations is not None:
            allowed = _allowed_constellations(select, r.constellations, r.topk_groups)
        else:
            allowed = _allowed_groups(select, r.n_groups, r.topk_groups)
        ranked = top([v if e in allowed else -math.inf for e, v in enumerate(select)], k)
        chosen.append(ranked)
        w = torch.stack([scores[e] for e in ranked])
        if r.renormalize:
            w = w / w.sum()
        weights[t] = w * r.scaling_factor
        priority[t] = torch.tensor([select[e] for e in ranked], dtype=logits.dtype)
    experts = torch.tensor(chosen, dtype=torch.long, device=logits.device).reshape(T, k)
    return experts, weights, priority


def _softmax_top(router: Router, logits: Tensor) -> Routing:
    """Softmax top-k within the allowed groups or constellations."""
    softmax = partial(torch.softmax, dim=0)
    experts, weights, priority = _token_choice(router, logits, softmax, [0.0] * router.n_experts)
    probs = torch.softmax(logits, 1)
    return Routing(experts=experts, weights=weights, priority=priority, logits=logits, probs=probs)


def topk_reference(router: Router, x_TD: Tensor) -> Routing:
    """Softmax top-k of the linear router's logits."""
    return _softmax_top(router, linear_logits(router, x_TD))


def attention_reference(router: AttentionRouter, x_TD: Tensor) -> Routing:
    """Softmax top-k of multi-head attention scores."""
    dtype = router_dtype(x_TD.dtype)
    T = x_TD.shape[0]
    scores = (
        torch.stack([_attention_scores(router, x_TD[t].to(dtype)) for t in range(T)])
        if T
        else x_TD.new_zeros(0, router.n_experts, dtype=dtype)
    )
    return _softmax_top(router, scores / float(router.live("temperature")))


def sigmoid_reference(router: Router, x_TD: Tensor) -> Routing:
    """Sigmoid scores; the expert bias enters selection and priority, never the weights."""
    logits = linear_logits(router, x_TD)
    bias = router.expert_bias.tolist()
    experts, weights, priority = _token_choice(router, logits, torch.sigmoid, bias)
    probs = torch.sigmoid(logits)
    probs = probs / probs.sum(1, keepdim=True)  # scores normalised over experts
    return Routing(experts=experts, weights=weights, priority=priority, logits=logits, probs=probs)


def expert_choice_reference(router: Router, x_TD: Tensor) -> Routing:
    """Each expert walks its tokens best-first and takes C of them; slot e holds expert e."""
    logits = linear_logits(router, x_TD)
    T, E = logits.shape
    probs = torch.softmax(logits, dim=1)
    factor = router.capacity_factor or router.options.capacity_factor
    C = min(T, math.ceil(factor * T * router.k / E))
    slots = [[-1] * E for _ in range(T)]
    weights = logits.new_zeros(T, E)
    for e in range(E):
        for t in top(probs[:, e].tolist(), C):
            slots[t][e] = e
            weights[t, e] = probs[t, e] * router.rcfg.scaling_factor
    return Routing(
        experts=torch.tensor(slots, dtype=torch.long, device=logits.device).reshape(T, E),
        weights=weights,
        priority=weights.detach(),
        logits=logits,
        probs=probs,
    )


def sinkhorn_reference(router: Router, x_TD: Tensor) -> Routing:
    """k rounds: balance exp(logits / tau) with alternating normalisations, assign with room."""
    logits = linear_logits(router, x_TD)
    r, o, k = router.rcfg, router.options, router.k
    T, E = logits.shape
    probs = torch.softmax(logits, dim=1)
    if T == 0:
        empty = logits.new_zeros(0, k)
        experts = torch.zeros(0, k, dtype=torch.long, device=logits.device)
        return Routing(experts=experts, weights=empty, priority=empty, logits=logits, probs=probs)
    scores = (logits.detach() / o.tau).tolist()
    allowed = [[True] * E for _ in range(T)]
    if o.candidates is not None and o.candidates < E:
        for t in range(T):
            keep = set(top(scores[t], o.candidates))
            allowed[t] = [e in keep for e in range(E)]
    blocked = torch.finfo(logits.dtype).min / 4
    chosen = [[] for _ in range(T)]
    for _ in range(k):
        masked = [
            [s if a else blocked for s, a in zip(srow, arow, strict=True)]
            for srow, arow in zip(scores, allowed, strict=True)
        ]
        plan = torch.tensor(masked, dtype=logits.dtype)
        for _ in range(o.iters):  # log domain: columns to T/E, then rows to 1
            plan = plan - torch.logsumexp(plan, 0, keepdim=True) + math.log(T / E)
            plan = plan - torch.logsumexp(plan, 1, keepdim=True)
        rows = [
            [v if a else -math.inf for v, a in zip(prow, arow, strict=True)]
            for prow, arow in zip(plan.tolist(), allowed, strict=True)
        ]
        for t, e in enumerate(_assign_with_room(rows)):
            chosen[t].append(e)
            allowed[t][e] = False
    raw = torch.stack([torch.stack([probs[t, e] for e in chosen[t]]) for t in range(T)])
    weights = raw / raw.sum(1, keepdim=True) if r.renormalize else raw
    return Routing(
        experts=torch.tensor(chosen, dtype=torch.long, device=logits.device),
        weights=weights * r.scaling_factor,
        priority=raw.detach(),
        logits=logits,
        probs=probs,
    )


def _assign_with_room(plan: list[list[float]]) -> list[int]:
    """Tokens propose to their best expert with room; experts accept their best proposals."""
    T, E = len(plan), len(plan[0])
    room = [math.ceil(T / E)] * E
    choice = [-1] * T
    avail = [row[:] for row in plan]
    for _ in range(E):
        proposals: dict[int, list[tuple[float, int]]] = {e: [] for e in range(E)}
        for t in range(T):
            if choice[t] < 0:
                e = top(avail[t], 1)[0]
                if avail[t][e] > -math.inf:
                    proposals[e].append((avail[t][e], t))
        for e, props in proposals.items():
            for _, t in sorted(props, key=lambda st: (-st[0], st[1]))[: room[e]]:
                choice[t] = e
                room[e] -= 1
        for row in avail:
            for e in range(E):
                if room[e] <= 0:
                    row[e] = -math.inf
    return [c if c >= 0 else top(plan[t], 1)[0] for t, c in enumerate(choice)]


# the oracles are attached from here, so no production router imports them
for _cls, _oracle in (
    (TopKRouter, topk_reference),
    (AttentionRouter, attention_reference),
    (SigmoidRouter, sigmoid_reference),
    (ExpertChoiceRouter, expert_choice_reference),
    (SinkhornRouter, sinkhorn_reference),
):
    _cls.reference = staticmethod(_oracle)
