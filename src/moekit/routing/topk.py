"""Top-k softmax routing (Shazeer et al. 2017; Mixtral, Qwen)."""

from __future__ import annotations

from torch import Tensor

from moekit.config import MoEConfig
from moekit.routing.base import (
    FusedSelect,
    Router,
    group_limited,
    membership_limited,
    membership_mask,
    renormalize,
)
from moekit.routing.registry import register_router
from moekit.types import Routing


@register_router("topk")
class TopKRouter(Router):
    """Softmax over experts, then each token takes its k best.

    Optionally limited to the best groups first: DeepSeek's equal `n_groups`, or arbitrary
    `constellations` (e.g. clusters of co-activated experts from `MoE.constellations`).
    It has no options of its own.
    """

    uses_capacity = True
    batch_invariant = True
    supports_constellations = True

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__(cfg)
        groups = cfg.router.constellations
        # derived from the config, so not saved in checkpoints
        members_GE = membership_mask(groups, cfg.n_experts) if groups is not None else None
        self.register_buffer("members_GE", members_GE, persistent=False)

    def select_fused(self, logits_TE: Tensor, fused: FusedSelect) -> Routing | None:
        if self.members_GE is not None or self.rcfg.n_groups != 1:
            return None
        return fused(logits_TE, self.k, self.rcfg.renormalize, self.rcfg.scaling_factor)

    def select(self, logits_TE: Tensor) -> Routing:
        probs_TE = logits_TE.softmax(dim=-1)
        if self.members_GE is not None:
            candidates_TE = membership_limited(probs_TE, self.members_GE, self.rcfg.topk_groups)
        else:
            candidates_TE = group_limited(probs_TE, self.rcfg.n_groups, self.rcfg.topk_groups)
        top_TK, experts_TK = candidates_TE.topk(self.k, dim=-1)
        weights_TK = top_TK
        if self.rcfg.renormalize:  # for every k: top-1 weighs 1.0, as in Mixtral
            weights_TK = renormalize(weights_TK)
        return self.routed(experts_TK, weights_TK, top_TK.detach(), logits_TE, probs_TE)
