"""Expert-choice routing (Zhou et al. 2022): each expert takes its top-C tokens.

Tokens may get 0..E experts, so a `Routing` here has K = E slots: slot e holds expert e
when expert e chose the token, -1 otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.config import RouterOptions
from moekit.routing.base import Router
from moekit.routing.registry import register_router
from moekit.types import Routing, capacity


def expert_choice_capacity(n_tokens: int, k: int, n_experts: int, factor: float) -> int:
    """C = ceil(factor * T * k / E), at most T."""
    return min(n_tokens, capacity(n_tokens, k, n_experts, factor))


@dataclass(frozen=True)
class ExpertChoiceOptions(RouterOptions):
    """How many tokens each expert takes when MoEConfig.capacity_factor is None."""

    capacity_factor: float = 1.0  # C = ceil(capacity_factor * T * k / E), at most T

    def __post_init__(self) -> None:
        cf = self.capacity_factor
        if not isinstance(cf, int | float) or not 0 < cf < float("inf"):
            raise ValueError(f"router.options.capacity_factor={cf!r} must be finite and > 0")


@register_router("expert_choice", options=ExpertChoiceOptions)
class ExpertChoiceRouter(Router):
    """Experts pick tokens; MoEConfig.capacity_factor, when set, sizes the picks (no drops)."""

    uses_capacity = False
    batch_invariant = False  # an expert's top-C depends on every token of the pass

    def select(self, logits_TE: Tensor) -> Routing:
        T, E = logits_TE.shape
        probs_TE = logits_TE.softmax(dim=-1)
        factor = self.capacity_factor or self.options.capacity_factor
        C = expert_choice_capacity(T, self.k, E, factor)
        # stable sort rather than topk: equal scores go to the earlier token, deterministically
        chosen_EC = probs_TE.t().argsort(dim=-1, descending=True, stable=True)[:, :C]  # [E, C]
        picked_TE = torch.zeros_like(probs_TE, dtype=torch.bool)
        picked_TE.t().scatter_(1, chosen_EC, True)
        slots_TE = torch.arange(E, device=logits_TE.device).expand(T, E)
        experts_TE = torch.where(picked_TE, slots_TE, -1)
        weights_TE = probs_TE * picked_TE
        return self.routed(experts_TE, weights_TE, probs_TE.detach(), logits_TE, probs_TE)
