"""The oracle: a slow, obviously-correct MoE forward written as per-token loops.

Every fast path (backends, kernels, parallel layers) is tested against `moe_forward`.
It reads the layer's parameters but shares none of its routing or dispatch code: routing
comes from the router class's own `reference` (`moekit.reference_routing` for the built-in
ones). It is deterministic (no noise, no dropout) and never updates buffers such as the
sigmoid bias. The router's input norm (RouterConfig.pre_norm: RMSNorm or LayerNorm) is applied
here, token by token.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit import reference_routing  # noqa: F401  (attaches the built-in routers' oracles)
from moekit.layer import MoE, MoEInfo, check_input
from moekit.routing.base import Router, router_dtype


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


def _router_input(router: Router, xs: Tensor) -> Tensor:
    """What the router reads: x, or per token x_t / rms(x_t) * weight (pre_norm "rms") or
    (x_t - mean) / std(x_t) * weight + bias (pre_norm "layer")."""
    if router.norm is None:
        return xs
    dtype = router_dtype(xs.dtype)
    weight, eps = router.norm.weight.to(dtype), router.norm.eps
    layer = router.rcfg.pre_norm == "layer"
    rows = []
    for t in range(xs.shape[0]):
        x_t = xs[t].to(dtype)
        if layer:
            x_t = x_t - x_t.sum() / x_t.numel()
        rms = torch.sqrt((x_t * x_t).sum() / x_t.numel() + eps)
        y_t = x_t / rms * weight
        rows.append(y_t + router.norm.bias.to(dtype) if layer else y_t)
    return torch.stack(rows) if rows else xs.to(dtype)


def moe_forward(moe: MoE, x: Tensor) -> tuple[Tensor, MoEInfo]:
    """Same contract as `moe(x)`, computed token by token; routing by the router's oracle."""
    cfg = moe.cfg
    router = type(moe.router)
    r = cfg.router
    random = r.noise != "none" or r.dropout > 0 or r.expert_dropout > 0 or cfg.expert.dropout > 0
    if moe.training and random:
        raise ValueError(
            "the reference is deterministic: call moe.eval() or use router.noise='none', "
            "router.dropout=0, router.expert_dropout=0 and expert.dropout=0"
        )
    if router.reference is None:
        raise ValueError(
            f"the reference has no routing for router.kind={cfg.router.kind!r}: "
            f"set `reference` on {router.__name__}"
        )
    check_input(x, cfg.d_model)
    lead = tuple(x.shape[:-1])
    xs = x.reshape(-1, cfg.d_model)
    T, E = xs.shape[0], cfg.n_experts
    dtype = router_dtype(x.dtype)
    routing = router.reference(moe.router, _router_input(moe.router, xs))
    weights, priority = routing.weights, routing.priority
    chosen = routing.experts.tolist()
    capacity = moe.router.capacity(T) if router.uses_capacity else None
    keep = _capacity_keep(chosen, priority, E, capacity)

    K = routing.experts.shape[1]
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
            y_fb = moe.fallback(xs[t : t + 1])[0]
            y_t = y_t + (y_fb if cfg.fallback_weight == 1.0 else cfg.fallback_weight * y_fb)
        rows.append(y_t.to(x.dtype))
    y = torch.stack(rows) if T else xs.new_zeros(0, cfg.d_model)

    kept = torch.tensor(keep, dtype=torch.bool, device=xs.device).reshape(T, K)
    info = MoEInfo(routing, kept, used, cfg.router, lead, capacity=capacity)
    return y.reshape(*lead, cfg.d_model), info
