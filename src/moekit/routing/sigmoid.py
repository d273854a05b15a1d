"""Sigmoid routing with DeepSeek-V3's auxiliary-loss-free load balancing.

A per-expert bias is added to the scores for *selection only*; the weights come from the
unbiased scores. Training forwards count each expert's load; once per optimiser step
(`before_optimizer_step`, called by the training step) the bias moves by
`options.bias_update_rate` towards balance: up for under-loaded experts, down for over-loaded
ones (DeepSeek-V3, sec. 2.1.2). Gradient accumulation counts every micro-batch of the step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.config import MoEConfig, RouterOptions
from moekit.routing.base import FusedSelect, Router, group_limited, renormalize
from moekit.routing.registry import register_router
from moekit.types import Routing


@dataclass(frozen=True)
class SigmoidOptions(RouterOptions):
    """How fast the selection bias moves towards balance."""

    bias_update_rate: float = 1e-3  # 0 disables the per-expert bias update

    def __post_init__(self) -> None:
        rate = self.bias_update_rate
        if not isinstance(rate, int | float) or not 0 <= rate < float("inf"):
            raise ValueError(f"router.options.bias_update_rate={rate!r} must be finite and >= 0")


@register_router("sigmoid", options=SigmoidOptions)
class SigmoidRouter(Router):
    """Sigmoid scores, top-k by score + bias; the bias moves once per optimiser step."""

    uses_capacity = True
    batch_invariant = True  # in inference: the bias is fixed, each token routes alone

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__(cfg)
        # saved with the model: the balance it learned is part of the routing function
        self.register_buffer("expert_bias", torch.zeros(cfg.n_experts, dtype=torch.float32))
        # slots each expert took in the training forwards since the last optimiser step
        self.register_buffer("load_E", torch.zeros(cfg.n_experts), persistent=False)
        # load_E [E] -> load_E: set by moekit.parallel to sum the load over the router's replicas
        self.load_reduce: Callable[[Tensor], Tensor] | None = None

    def select_fused(self, logits_TE: Tensor, fused: FusedSelect) -> Routing | None:
        if self.training or self.rcfg.n_groups != 1:  # the bias moves in training
            return None
        rcfg = self.rcfg
        return fused(logits_TE, self.k, rcfg.renormalize, rcfg.scaling_factor, self.expert_bias)

    def select(self, logits_TE: Tensor) -> Routing:
        scores_TE = logits_TE.sigmoid()
        biased_TE = scores_TE.detach() + self.expert_bias.to(scores_TE.dtype)
        biased_TE = group_limited(biased_TE, self.rcfg.n_groups, self.rcfg.topk_groups)
        experts_TK = biased_TE.topk(self.k, dim=-1).indices
        weights_TK = scores_TE.gather(1, experts_TK)
        if self.rcfg.renormalize:  # for every k (DeepSeek-V3 norm_topk_prob)
            weights_TK = renormalize(weights_TK)
        if self.training and self.options.bias_update_rate > 0:
            self._count_load(experts_TK)
        probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True).clamp_min(1e-20)
        return self.routed(
            experts_TK, weights_TK, biased_TE.gather(1, experts_TK), logits_TE, probs_TE
        )

    @torch.no_grad()
    def _count_load(self, experts_TK: Tensor) -> None:
        """load_E += slots per expert: a buffer update, no host sync."""
        flat = experts_TK.reshape(-1)
        self.load_E.scatter_add_(0, flat, torch.ones_like(flat, dtype=self.load_E.dtype))

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """bias += rate * sign(mean load - load) over the step's counted load, then reset it.

        A step without training forwards (all-zero load) leaves the bias alone.
        """
        load_E = self.load_E
        if self.load_reduce is not None:  # every replica calls this once per step
            load_E = self.load_reduce(load_E.clone())
        rate = self.options.bias_update_rate
        self.expert_bias.add_(rate * torch.sign(load_E.mean() - load_E))
        self.load_E.zero_()
