"""The router registry: a router defined outside moekit gets its options, oracle and flags."""

import math
from dataclasses import dataclass

import pytest
import torch
from tests.oracle import against_reference, make_moe, rel

import moekit
from moekit.config import RouterOptions
from moekit.routing import Routing, available_routers, build_options, router_class, router_options
from moekit.routing.base import Router


@dataclass(frozen=True)
class RotatedOptions(RouterOptions):
    """The toy router's own option: how far its picks are rotated."""

    shift: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.shift, int) or self.shift < 0:
            raise ValueError(f"router.options.shift={self.shift!r} must be an integer >= 0")


def rotated_reference(router: Router, x_TD: torch.Tensor) -> Routing:
    """Per-token loop: softmax, the k best, each rotated by `shift` expert ids."""
    E, k, shift = router.n_experts, router.k, router.options.shift
    rows, experts = [], []
    for t in range(x_TD.shape[0]):
        logits = torch.stack([router.weight[e] @ x_TD[t] for e in range(E)])
        scores = torch.softmax(logits / router.rcfg.temperature, dim=0).detach().tolist()
        best = sorted(range(E), key=lambda e: -scores[e])[:k]
        experts.append([(e + shift) % E for e in best])
        rows.append(logits / router.rcfg.temperature)
    logits_TE = torch.stack(rows)
    probs_TE = torch.softmax(logits_TE, dim=1)
    experts_TK = torch.tensor(experts)
    weights_TK = torch.stack([probs_TE[t, experts_TK[t]] for t in range(len(experts))])
    return Routing(experts_TK, weights_TK, weights_TK.detach(), logits_TE, probs_TE)


@moekit.register_router("rotated_test", options=RotatedOptions)
class RotatedRouter(Router):
    """Top-k by softmax, then every pick moved `shift` experts along (weights follow)."""

    uses_capacity = True
    batch_invariant = True
    reference = staticmethod(rotated_reference)

    def select(self, logits_TE):
        probs_TE = logits_TE.softmax(dim=-1)
        best_TK = probs_TE.topk(self.k, dim=-1).indices
        experts_TK = (best_TK + self.options.shift) % self.n_experts
        weights_TK = probs_TE.gather(1, experts_TK)
        return Routing(experts_TK, weights_TK, weights_TK.detach(), logits_TE, probs_TE)


def rotated(shift=2, **fields):
    router = moekit.RouterConfig(kind="rotated_test", options={"shift": shift})
    return make_moe(router, n_experts=6, **fields)


def test_builtin_routers_registered_with_their_flags():
    assert {"topk", "sigmoid", "expert_choice", "sinkhorn", "attention"} <= set(available_routers())
    flags = {
        kind: (router_class(kind).uses_capacity, router_class(kind).batch_invariant)
        for kind in ("topk", "sigmoid", "expert_choice", "sinkhorn", "attention")
    }
    assert flags == {
        "topk": (True, True),
        "sigmoid": (True, True),
        "expert_choice": (False, False),
        "sinkhorn": (True, False),
        "attention": (True, True),
    }
    assert all(router_class(kind).reference is not None for kind in flags)
    assert router_options("sinkhorn")().iters == 50


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_outside_router_runs_in_the_layer_and_the_oracle(capacity_factor):
    torch.manual_seed(0)
    moe = rotated(capacity_factor=capacity_factor)
    assert isinstance(moe.router, RotatedRouter) and moe.router.options == RotatedOptions(2)
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    layer, ref = against_reference(moe, x)
    best = (x.reshape(-1, 8) @ moe.router.weight.T).topk(2, dim=-1).indices
    picked = moe.router(x.reshape(-1, 8)).experts
    assert torch.equal(picked, (best + 2) % 6)  # its own option reached the router
    assert torch.equal(layer.info.routing.experts, ref.info.routing.experts)
    if capacity_factor is not None:  # uses_capacity: the layer and the oracle both drop
        assert layer.info.metrics["dropped_fraction"] > 0
    assert rel(layer.y, ref.y) < 1e-10 and rel(layer.grad_x, ref.grad_x) < 1e-10
    assert set(layer.grads) == set(ref.grads)
    for name in layer.grads:
        assert rel(layer.grads[name], ref.grads[name]) < 1e-10, name
    assert math.isclose(layer.info.aux_loss.item(), ref.info.aux_loss.item(), rel_tol=1e-10)


def test_outside_router_options_are_validated_and_round_trip():
    with pytest.raises(ValueError, match=r"router\.options\.shift=-1"):
        build_options("rotated_test", {"shift": -1})
    with pytest.raises(ValueError, match="unknown router.options key.*'rotated_test'.*shift_by"):
        moekit.MoE(moekit.MoEConfig(router={"kind": "rotated_test", "options": {"shift_by": 1}}))
    cfg = moekit.MoEConfig(n_experts=6, router={"kind": "rotated_test", "options": {"shift": 3}})
    assert moekit.MoE(cfg).router.options == RotatedOptions(shift=3)
    assert cfg.to_dict()["router"]["options"] == {"shift": 3}
    assert moekit.MoEConfig.from_dict(cfg.to_dict()) == cfg


def test_options_must_be_a_router_options_dataclass():
    @dataclass
    class Loose:
        shift: int = 1

    with pytest.raises(ValueError, match="RouterOptions dataclass"):
        moekit.register_router("loose_test", options=Loose)


def test_a_router_without_a_reference_is_refused_by_the_oracle():
    @moekit.register_router("first_k_test")
    class FirstK(Router):
        """Always the first k experts, equal weights: easy to check end to end."""

        batch_invariant = True

        def select(self, logits_TE):
            T = logits_TE.shape[0]
            experts = torch.arange(self.k).expand(T, self.k)
            weights = torch.full((T, self.k), 1.0 / self.k, dtype=logits_TE.dtype)
            return Routing(experts, weights, weights, logits_TE, logits_TE.softmax(-1))

    cfg = moekit.MoEConfig(
        d_model=8, d_hidden=4, n_experts=4, k=2, router=moekit.RouterConfig(kind="first_k_test")
    )
    moe = moekit.MoE(cfg)
    assert moe.router.options == RouterOptions()  # no options of its own
    x = torch.randn(5, 8)
    y, info = moe(x)
    expected = 0.5 * (moe.experts.expert(0, x) + moe.experts.expert(1, x))
    assert torch.allclose(y, expected, atol=1e-6)
    assert torch.equal(info.metrics["expert_load"], torch.tensor([0.5, 0.5, 0.0, 0.0]))
    with pytest.raises(ValueError, match="no routing for router.kind='first_k_test'"):
        moekit.reference.moe_forward(moe.eval(), x)
