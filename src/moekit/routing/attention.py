"""Attention ("supervisor") routing: tokens attend over learned expert embeddings.

Each token's query, split into heads, is scored against every expert's key; the logit of
expert e is the mean over heads of q_h . k_{h,e} / sqrt(d) (scaled dot-product attention,
Vaswani et al. 2017), and selection is the softmax top-k of `TopKRouter`, so group limits,
constellations, losses and metrics are shared with it.

Shape legend: T tokens, E experts, D model dim, N heads, A per-head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moekit.config import MoEConfig, RouterOptions
from moekit.routing.base import router_dtype
from moekit.routing.registry import register_router
from moekit.routing.topk import TopKRouter


@dataclass(frozen=True)
class AttentionOptions(RouterOptions):
    """Heads and per-head width of the query / key projections."""

    heads: int = 4
    dim: int = 32

    def __post_init__(self) -> None:
        for name in ("heads", "dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"router.options.{name}={value!r} must be an integer >= 1")


@register_router("attention", options=AttentionOptions)
class AttentionRouter(TopKRouter):
    """Multi-head attention scores from tokens to experts as router logits.

    ``weight`` [E, D] stays the per-expert embedding in model space (as for the linear
    routers); ``key`` [N*A, D] maps it to per-head keys and ``query`` [N*A, D] maps tokens to
    queries. With one head and identity projections this is the linear router scaled by
    1/sqrt(A).
    """

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__(cfg)
        self.n_heads, self.head_dim = self.options.heads, self.options.dim
        width = self.n_heads * self.head_dim
        self.query = nn.Parameter(torch.empty(width, cfg.d_model))
        self.key = nn.Parameter(torch.empty(width, cfg.d_model))
        for w in (self.query, self.key):  # unit-variance projections of unit-variance inputs
            nn.init.normal_(w, std=1.0 / math.sqrt(cfg.d_model))

    def logits(self, x_TD: Tensor) -> Tensor:
        """Clean logits [T, E]: mean over heads of scaled q . k, divided by the temperature."""
        dtype = router_dtype(x_TD.dtype)
        T, N, A = x_TD.shape[0], self.n_heads, self.head_dim
        q_TNA = (x_TD.to(dtype) @ self.query.to(dtype).T).view(T, N, A)
        k_ENA = (self.weight.to(dtype) @ self.key.to(dtype).T).view(-1, N, A)
        scores_TE = torch.einsum("tna,ena->te", q_TNA, k_ENA) / (N * math.sqrt(A))
        return scores_TE / self.live("temperature")
