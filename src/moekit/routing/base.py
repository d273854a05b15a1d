"""The routing contract: a router turns x [T, D] into a `Routing`.

Shape legend: T tokens, E experts, K slots per token (k for token-choice routers,
E for expert choice), D model dim.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.config import MoEConfig, RouterOptions
from moekit.types import Routing, capacity

# scheduled options the router reads as device scalars (capacity_factor stays a Python number:
# the plan's capacity is a size)
LIVE_OPTIONS = ("temperature", "noise_std")
# a backend's fused selection: (logits_TE, k, renormalize, scaling, bias_E) -> Routing or None
FusedSelect = Callable[..., "Routing | None"]


def router_dtype(dtype: torch.dtype) -> torch.dtype:
    """Router math runs in float32, or float64 when the input is float64."""
    return torch.promote_types(dtype, torch.float32)


def group_limited(scores_TE: Tensor, n_groups: int, topk_groups: int) -> Tensor:
    """Mask experts outside each token's best `topk_groups` groups with -inf.

    A group's score is the sum of its top-2 expert scores (DeepSeek-V3 node-limited routing).
    """
    if n_groups == 1:
        return scores_TE
    T, E = scores_TE.shape
    grouped = scores_TE.view(T, n_groups, E // n_groups)  # [T, G, E/G]
    top = min(2, E // n_groups)
    group_score_TG = grouped.topk(top, dim=-1).values.sum(-1)
    keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool)
    keep_TG.scatter_(1, group_score_TG.topk(topk_groups, dim=-1).indices, True)
    keep_TE = keep_TG.unsqueeze(-1).expand_as(grouped).reshape(T, E)
    return scores_TE.masked_fill(~keep_TE, float("-inf"))


def membership_mask(groups: list[list[int]], n_experts: int) -> Tensor:
    """[G, E] bool: row g marks the experts of group g (groups may differ in size)."""
    members_GE = torch.zeros(len(groups), n_experts, dtype=torch.bool)
    for g, experts in enumerate(groups):
        members_GE[g, experts] = True
    return members_GE


def membership_limited(scores_TE: Tensor, members_GE: Tensor, topk_groups: int) -> Tensor:
    """`group_limited` over arbitrary groups: mask experts outside each token's best groups.

    members_GE [G, E] bool may describe uneven groups (expert constellations). A group's score
    is the sum of its top-2 member scores (its only score for a one-expert group), the
    DeepSeek-V3 rule; ties between groups go to the lower group index.
    """
    T, E = scores_TE.shape
    G = members_GE.shape[0]
    inside_TGE = scores_TE.unsqueeze(1).masked_fill(~members_GE, float("-inf"))  # [T, G, E]
    top_TG2 = inside_TGE.topk(min(2, E), dim=-1).values
    real_G2 = torch.arange(top_TG2.shape[-1], device=scores_TE.device) < members_GE.sum(
        -1, keepdim=True
    )
    group_score_TG = torch.where(real_G2, top_TG2, 0.0).sum(-1)
    ranked_TG = group_score_TG.argsort(dim=-1, descending=True, stable=True)
    keep_TG = torch.zeros(T, G, dtype=torch.bool, device=scores_TE.device)
    keep_TG.scatter_(1, ranked_TG[:, :topk_groups], True)
    keep_TE = (keep_TG.unsqueeze(-1) & members_GE).any(1)  # [T, E]
    return scores_TE.masked_fill(~keep_TE, float("-inf"))


def renormalize(weights_TK: Tensor) -> Tensor:
    """Selected weights rescaled to sum to 1 per token (Mixtral / Qwen top-k)."""
    return weights_TK / weights_TK.sum(-1, keepdim=True).clamp_min(
        torch.finfo(weights_TK.dtype).tiny
    )


class InputNorm(nn.Module):
    """RMSNorm of the router's input (Zhang & Sennrich 2019), in router precision."""

    eps = 1e-6

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d_model))

    def forward(self, x_TD: Tensor) -> Tensor:
        x = x_TD.to(router_dtype(x_TD.dtype))
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + self.eps) * self.weight


class LayerInputNorm(nn.Module):
    """LayerNorm of the router's input (own weight and bias), in router precision."""

    eps = 1e-5

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d_model))
        self.bias = nn.Parameter(torch.zeros(d_model))

    def forward(self, x_TD: Tensor) -> Tensor:
        dtype = router_dtype(x_TD.dtype)
        w, b = self.weight.to(dtype), self.bias.to(dtype)
        return F.layer_norm(x_TD.to(dtype), w.shape, w, b, self.eps)


# RouterConfig.pre_norm -> the router's input norm ("none": no module)
INPUT_NORMS: dict[str, type[nn.Module]] = {"rms": InputNorm, "layer": LayerInputNorm}


def drop_slots(routing: Routing, p: float) -> Routing:
    """Expert dropout: each chosen slot is emptied with probability p, survivors scaled 1/(1-p)."""
    keep_TK = torch.rand(routing.experts.shape, device=routing.experts.device) >= p
    return replace(
        routing,
        experts=torch.where(keep_TK, routing.experts, -1),
        weights=torch.where(keep_TK, routing.weights / (1.0 - p), 0.0),
    )


class Router(nn.Module):
    """Base router: float32 logits x @ weight.T, temperature and training noise.

    Subclasses implement `select(logits_TE) -> Routing`; everything else is shared so every
    router gets the same input norm, dropouts, noise, schedules, losses and metrics. The class
    attributes below tell the layer, the oracle and the server how to treat a router, so none
    of them asks its name.
    """

    # MoEConfig.capacity_factor drops this router's slots (False: it sizes its own choices)
    uses_capacity: ClassVar[bool] = True
    # a token's routing ignores the other tokens of its forward pass, so batching and prefix
    # reuse cannot change it; False is the safe answer for a router that has not said
    batch_invariant: ClassVar[bool] = False
    # RouterConfig.constellations may limit this router's choices to groups of experts
    supports_constellations: ClassVar[bool] = False
    # the oracle of `moekit.reference`: (router, x_TD [T, D]) -> Routing, written as loops
    # that share no code with `forward`; None when the router has none
    reference: ClassVar[Callable[[Router, Tensor], Routing] | None] = None

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        if not isinstance(cfg.router.options, RouterOptions):
            raise ValueError("routers are made by moekit.routing.build_router (it builds options)")
        self.cfg = cfg
        self.rcfg = cfg.router
        self.options = cfg.router.options  # this router's own options dataclass
        self.n_experts = cfg.n_experts
        self.k = cfg.k
        self.weight = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_model))
        nn.init.normal_(self.weight, std=cfg.expert.init_std)
        norm = INPUT_NORMS.get(cfg.router.pre_norm)
        self.norm = norm(cfg.d_model) if norm is not None else None
        # scheduled options live here, never in the config every block shares: they start at
        # each schedule's end (what a trained model serves with) until `set_step` moves them
        schedules = cfg.router.schedules or {}
        cf = schedules.get("capacity_factor")
        self.capacity_factor = cfg.capacity_factor if cf is None else cf.end  # a size: a number
        for name in LIVE_OPTIONS:  # device scalars: moving them recompiles nothing
            if name in schedules:
                value = torch.tensor(schedules[name].end, dtype=torch.float32)
                self.register_buffer(f"live_{name}", value, persistent=False)

    def live(self, name: str) -> float | Tensor:
        """Router option `name` now: a device scalar when scheduled, else the config's number."""
        value = getattr(self, f"live_{name}", None)
        return getattr(self.rcfg, name) if value is None else value

    @torch.no_grad()
    def set_step(self, step: int) -> dict[str, float]:
        """Set every scheduled option to its value at optimiser step `step`; returns them."""
        values = {}
        for name, schedule in (self.rcfg.schedules or {}).items():
            values[name] = schedule.value(step)
            if name == "capacity_factor":
                self.capacity_factor = values[name]
            else:
                getattr(self, f"live_{name}").fill_(values[name])  # no host sync
        return values

    def capacity(self, n_tokens: int) -> int | None:
        """Per-expert capacity at the live capacity factor, or None when dropless."""
        return capacity(n_tokens, self.k, self.n_experts, self.capacity_factor)

    def before_optimizer_step(self) -> None:
        """Once per optimiser step, after the backward of every micro-batch: state a router
        keeps across forwards moves here (the training step calls it), not in the forward."""

    def logits(self, x_TD: Tensor) -> Tensor:
        """Clean logits [T, E] in router precision, divided by the temperature."""
        dtype = router_dtype(x_TD.dtype)
        return F.linear(x_TD.to(dtype), self.weight.to(dtype)) / self.live("temperature")

    def forward(self, x_TD: Tensor, fused: FusedSelect | None = None) -> Routing:
        """Routing of x_TD [T, D]; `fused` is a backend's one-kernel selection (its `select`),
        tried by routers that have one before their torch code."""
        device_type = x_TD.device.type
        if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
            with torch.autocast(device_type, enabled=False):  # router math stays float32
                return self._route(x_TD, fused)
        return self._route(x_TD, fused)

    def _route(self, x_TD: Tensor, fused: FusedSelect | None) -> Routing:
        if self.norm is not None:
            x_TD = self.norm(x_TD)
        if self.training and self.rcfg.dropout > 0:
            x_TD = F.dropout(x_TD, self.rcfg.dropout)
        noise, std = self.rcfg.noise, self.live("noise_std")
        noisy = self.training and noise != "none" and (isinstance(std, Tensor) or std > 0)
        if noisy and noise == "jitter":  # Switch Transformer multiplicative input jitter
            x_TD = x_TD * _jitter(x_TD, std)
        logits_TE = self.logits(x_TD)
        scored_TE = logits_TE
        if noisy and noise == "gaussian":  # noisy top-k gating (Shazeer et al. 2017)
            scored_TE = logits_TE + torch.randn_like(logits_TE) * std
        elif noisy and noise == "gumbel":
            u = torch.rand_like(logits_TE).clamp_(1e-9, 1.0 - 1e-9)
            scored_TE = logits_TE - torch.log(-torch.log(u)) * std
        routing = self.select_fused(scored_TE, fused) if fused is not None else None
        if routing is None:
            routing = self.select(scored_TE)
        routing.logits = logits_TE
        if self.training and self.rcfg.expert_dropout > 0:
            routing = drop_slots(routing, self.rcfg.expert_dropout)
        return routing

    def select(self, logits_TE: Tensor) -> Routing:
        raise NotImplementedError

    def routed(
        self,
        experts: Tensor,
        weights: Tensor,
        priority: Tensor,
        logits_TE: Tensor,
        probs_TE: Tensor,
    ) -> Routing:
        """A selection's Routing ([T, K] or [T, E] slots), weights scaled by scaling_factor."""
        weights = weights * self.rcfg.scaling_factor
        return Routing(experts, weights, priority=priority, logits=logits_TE, probs=probs_TE)

    def select_fused(self, logits_TE: Tensor, fused: FusedSelect) -> Routing | None:
        """`select` by a backend's kernel where it computes this router's choice, else None."""
        return None


def _jitter(x_TD: Tensor, std: float | Tensor) -> Tensor:
    """Uniform factors in [1 - std, 1 + std] shaped like x; std may be a device scalar."""
    if isinstance(std, Tensor):
        return 1.0 + torch.empty_like(x_TD).uniform_(-1.0, 1.0) * std
    return torch.empty_like(x_TD).uniform_(1.0 - std, 1.0 + std)
