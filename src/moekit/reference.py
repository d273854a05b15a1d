"""The oracle: a slow, obviously-correct MoE forward written as per-token loops.

Every fast path (backends, kernels, parallel layers) is tested against `moe_forward`.
It reads the layer's parameters but shares none of its routing or dispatch code; it is
deterministic (no noise) and never updates buffers such as the sigmoid router's bias.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moekit.layer import MoE, MoEInfo, check_input
from moekit.routing.base import Routing, router_dtype
from moekit.routing.losses import router_losses, routing_metrics, weighted_aux_loss


def _top(values: list[float], n: int) -> list[int]:
    """Indices of the n largest values, best first (ties: lower index first)."""
    return sorted(range(len(values)), key=lambda i: (-values[i], i))[:n]


def _allowed_groups(scores: list[float], n_groups: int, topk_groups: int) -> set[int]:
    """Experts inside the token's best groups (group score = sum of its top-2 scores)."""
    size = len(scores) // n_groups
    group_scores = []
    for g in range(n_groups):
        members = sorted(scores[g * size : (g + 1) * size], reverse=True)
        group_scores.append(sum(members[: min(2, size)]))
    allowed = set()
    for g in _top(group_scores, topk_groups):
        allowed.update(range(g * size, (g + 1) * size))
    return allowed


def _allowed_constellations(
    scores: list[float], groups: list[list[int]], topk_groups: int
) -> set[int]:
    """Experts inside the token's best constellations (score = sum of its top-2 members)."""
    group_scores = [sum(sorted((scores[e] for e in g), reverse=True)[:2]) for g in groups]
    allowed = set()
    for g in _top(group_scores, topk_groups):
        allowed.update(groups[g])
    return allowed


def _attention_logits(moe: MoE, x_t: Tensor) -> Tensor:
    """Attention router logits [E] of one token: mean over heads h of q_h . k_{h,e} / sqrt(A)."""
    router = moe.router
    N, A = router.n_heads, router.head_dim
    logits = []
    for e in range(moe.cfg.n_experts):
        total = x_t.new_zeros(())
        for h in range(N):
            rows = slice(h * A, (h + 1) * A)
            q = router.query[rows].to(x_t.dtype) @ x_t
            k = router.key[rows].to(x_t.dtype) @ router.weight[e].to(x_t.dtype)
            total = total + (q * k).sum() / math.sqrt(A)
        logits.append(total / N)
    return torch.stack(logits)


def _token_choice(moe: MoE, logits: Tensor) -> tuple[list[list[int]], Tensor, Tensor]:
    """topk / attention / sigmoid routing per token: (experts, weights [T, k], priorities)."""
    cfg, r = moe.cfg, moe.cfg.router
    T, k = logits.shape[0], cfg.k
    weights = logits.new_zeros(T, k)
    priority = logits.new_zeros(T, k)
    chosen = []
    for t in range(T):
        if r.kind in ("topk", "attention"):
            scores = torch.softmax(logits[t], dim=0)
            select = scores.detach().tolist()
        else:  # sigmoid: bias only for selection
            scores = torch.sigmoid(logits[t])
            bias = moe.router.expert_bias.tolist()
            select = [s + b for s, b in zip(scores.detach().tolist(), bias, strict=True)]
        if r.constellations is not None:
            allowed = _allowed_constellations(select, r.constellations, r.topk_groups)
        else:
            allowed = _allowed_groups(select, r.n_groups, r.topk_groups)
        ranked = _top([v if e in allowed else -math.inf for e, v in enumerate(select)], k)
        chosen.append(ranked)
        w = torch.stack([scores[e] for e in ranked])
        if r.renormalize and k > 1:
            w = w / w.sum()
        weights[t] = w * r.scaling_factor
        priority[t] = torch.tensor([select[e] for e in ranked], dtype=logits.dtype)
    return chosen, weights, priority


def _expert_choice(moe: MoE, logits: Tensor) -> tuple[list[list[int]], Tensor]:
    """Each expert walks its tokens best-first and takes C of them."""
    T, E = logits.shape
    probs = torch.softmax(logits, dim=1)
    factor = moe.cfg.capacity_factor or moe.cfg.router.expert_choice_capacity
    C = min(T, math.ceil(factor * T * moe.cfg.k / E))
    slots = [[-1] * E for _ in range(T)]
    weights = logits.new_zeros(T, E)
    for e in range(E):
        for t in _top(probs[:, e].tolist(), C):
            slots[t][e] = e
            weights[t, e] = probs[t, e] * moe.cfg.router.scaling_factor
    return slots, weights


def _sinkhorn(moe: MoE, logits: Tensor) -> tuple[list[list[int]], Tensor, Tensor]:
    """k rounds: balance exp(logits / tau) with alternating normalisations, take the row max."""
    r, k = moe.cfg.router, moe.cfg.k
    T, E = logits.shape
    if T == 0:
        empty = logits.new_zeros(0, k)
        return [], empty, empty
    scores = (logits.detach() / r.sinkhorn_tau).tolist()
    allowed = [[True] * E for _ in range(T)]
    if r.sinkhorn_candidates is not None and r.sinkhorn_candidates < E:
        for t in range(T):
            keep = set(_top(scores[t], r.sinkhorn_candidates))
            allowed[t] = [e in keep for e in range(E)]
    blocked = torch.finfo(logits.dtype).min / 4
    probs = torch.softmax(logits, dim=1)
    chosen = [[] for _ in range(T)]
    for _ in range(k):
        masked = [
            [s if a else blocked for s, a in zip(srow, arow, strict=True)]
            for srow, arow in zip(scores, allowed, strict=True)
        ]
        plan = torch.tensor(masked, dtype=logits.dtype)
        for _ in range(r.sinkhorn_iters):  # log domain: columns to T/E, then rows to 1
            plan = plan - torch.logsumexp(plan, 0, keepdim=True) + math.log(T / E)
            plan = plan - torch.logsumexp(plan, 1, keepdim=True)
        rows = [
            [v if a else -math.inf for v, a in zip(prow, arow, strict=True)]
            for prow, arow in zip(plan.tolist(), allowed, strict=True)
        ]
        for t, e in enumerate(_assign_with_room(rows)):
            chosen[t].append(e)
            allowed[t][e] = False
    raw = (
        torch.stack([torch.stack([probs[t, e] for e in chosen[t]]) for t in range(T)])
        if T
        else logits.new_zeros(0, k)
    )
    weights = raw / raw.sum(1, keepdim=True) if (r.renormalize and k > 1 and T) else raw
    return chosen, weights * r.scaling_factor, raw.detach()


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
                e = _top(avail[t], 1)[0]
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
    return [c if c >= 0 else _top(plan[t], 1)[0] for t, c in enumerate(choice)]


def _capacity_keep(
    chosen: list[list[int]], priority: Tensor, E: int, C: int | None
) -> list[list[bool]]:
    """Per expert, keep the C slots with the highest priority."""
    keep = [[e >= 0 for e in slots] for slots in chosen]
    if C is None:
        return keep
    for e in range(E):
        slots = [(t, j) for t, s in enumerate(chosen) for j, ex in enumerate(s) if ex == e]
        slots.sort(key=lambda tj: (-float(priority[tj]), tj))
        for t, j in slots[C:]:
            keep[t][j] = False
    return keep


def moe_forward(moe: MoE, x: Tensor) -> tuple[Tensor, MoEInfo]:
    """Same contract as `moe(x)`, computed token by token."""
    cfg = moe.cfg
    if moe.training and cfg.router.noise != "none":
        raise ValueError(
            "the reference is deterministic: call moe.eval() or use router.noise='none'"
        )
    check_input(x, cfg.d_model)
    lead = tuple(x.shape[:-1])
    xs = x.reshape(-1, cfg.d_model)
    T, E = xs.shape[0], cfg.n_experts
    dtype = router_dtype(x.dtype)
    w_router = moe.router.weight.to(dtype)
    logits = (
        torch.stack(
            [
                _attention_logits(moe, xs[t].to(dtype))
                if cfg.router.kind == "attention"
                else w_router @ xs[t].to(dtype)
                for t in range(T)
            ]
        )
        if T
        else xs.new_zeros(0, E, dtype=dtype)
    )
    logits = logits / cfg.router.temperature

    kind = cfg.router.kind
    capacity = cfg.capacity(T)
    if kind == "expert_choice":
        chosen, weights = _expert_choice(moe, logits)
        priority, capacity = weights.detach(), None
        probs = torch.softmax(logits, 1)
    elif kind == "sinkhorn":
        chosen, weights, priority = _sinkhorn(moe, logits)
        probs = torch.softmax(logits, 1)
    elif kind in ("topk", "sigmoid", "attention"):
        chosen, weights, priority = _token_choice(moe, logits)
        probs = torch.softmax(logits, 1) if kind != "sigmoid" else torch.sigmoid(logits)
        probs = probs / probs.sum(1, keepdim=True) if kind == "sigmoid" else probs
    else:
        raise ValueError(f"the reference has no routing for router.kind={kind!r}")
    keep = _capacity_keep(chosen, priority, E, capacity)

    K = len(chosen[0]) if T else (E if kind == "expert_choice" else cfg.k)
    used = weights.clone()
    rows = []
    for t in range(T):
        kept_w = [weights[t, j] if keep[t][j] else weights.new_zeros(()) for j in range(K)]
        if cfg.renormalize_after_drop and capacity is not None:
            total, kept_total = weights[t].sum(), sum(kept_w)
            scale = total / kept_total if any(keep[t]) else weights.new_zeros(())
            kept_w = [w * scale for w in kept_w]
        used[t] = torch.stack(kept_w)
        y_t = xs.new_zeros(cfg.d_model, dtype=torch.promote_types(x.dtype, dtype))
        for j, e in enumerate(chosen[t]):
            if keep[t][j]:
                y_t = y_t + kept_w[j] * moe.experts.expert(e, xs[t : t + 1])[0]
        if moe.shared is not None:
            y_t = y_t + moe.shared(xs[t : t + 1])[0]
        if moe.fallback is not None and not any(keep[t]):
            y_t = y_t + moe.fallback(xs[t : t + 1])[0]
        rows.append(y_t.to(x.dtype))
    y = torch.stack(rows) if T else xs.new_zeros(0, cfg.d_model)

    experts = torch.tensor(chosen, dtype=torch.long, device=xs.device).reshape(T, K)
    kept = torch.tensor(keep, dtype=torch.bool, device=xs.device).reshape(T, K)
    routing = Routing(
        experts=experts, weights=weights, priority=priority, logits=logits, probs=probs
    )
    losses = router_losses(routing, lead)
    info = MoEInfo(
        aux_loss=weighted_aux_loss(losses, cfg.router),
        metrics=routing_metrics(routing, kept, E, losses),
        routing=Routing(
            experts=torch.where(kept, experts, -1),
            weights=used,
            priority=priority,
            logits=logits,
            probs=probs,
        ),
    )
    return y.reshape(*lead, cfg.d_model), info
