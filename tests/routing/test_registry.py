import torch

import moekit
from moekit.routing import Routing, available_routers
from moekit.routing.base import Router


def test_builtin_routers_registered():
    assert {"topk", "sigmoid", "expert_choice", "sinkhorn"} <= set(available_routers())


def test_user_router_with_a_decorator():
    @moekit.register_router("first_k_test")
    class FirstK(Router):
        """Always the first k experts, equal weights: easy to check end to end."""

        def select(self, logits_TE):
            T = logits_TE.shape[0]
            experts = torch.arange(self.k).expand(T, self.k)
            weights = torch.full((T, self.k), 1.0 / self.k, dtype=logits_TE.dtype)
            return Routing(experts, weights, weights, logits_TE, logits_TE.softmax(-1))

    cfg = moekit.MoEConfig(
        d_model=8, d_hidden=4, n_experts=4, k=2, router=moekit.RouterConfig(kind="first_k_test")
    )
    moe = moekit.MoE(cfg)
    x = torch.randn(5, 8)
    y, info = moe(x)
    expected = 0.5 * (moe.experts.expert(0, x) + moe.experts.expert(1, x))
    assert torch.allclose(y, expected, atol=1e-6)
    assert torch.equal(info.metrics["expert_load"], torch.tensor([0.5, 0.5, 0.0, 0.0]))
