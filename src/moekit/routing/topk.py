"""Top-k softmax routing (Shazeer et al. 2017; Mixtral, Qwen)."""

from __future__ import annotations

from torch import Tensor

from moekit.routing import register_router
from moekit.routing.base import Router, Routing, group_limited, renormalize


@register_router("topk")
class TopKRouter(Router):
    """Softmax over experts, then each token takes its k best (optionally group-limited)."""

    def select(self, logits_TE: Tensor) -> Routing:
        probs_TE = logits_TE.softmax(dim=-1)
        candidates_TE = group_limited(probs_TE, self.rcfg.n_groups, self.rcfg.topk_groups)
        top_TK, experts_TK = candidates_TE.topk(self.k, dim=-1)
        weights_TK = top_TK
        if self.rcfg.renormalize and self.k > 1:
            weights_TK = renormalize(weights_TK)
        return Routing(
            experts=experts_TK,
            weights=weights_TK * self.rcfg.scaling_factor,
            priority=top_TK.detach(),
            logits=logits_TE,
            probs=probs_TE,
        )
