"""The attention ("supervisor") router against the per-token reference."""

import math

import pytest
import torch
from tests.oracle import against_reference, rel
from tests.oracle import make_moe as oracle_moe

import moekit
from moekit.routing.attention import AttentionRouter


def make_moe(capacity_factor=None, heads=3, dim=5, dtype=torch.float64, **router):
    """The oracle's layer with an attention router over 6 experts."""
    router = moekit.RouterConfig(kind="attention", options={"heads": heads, "dim": dim}, **router)
    return oracle_moe(
        router,
        dtype=dtype,
        n_experts=6,
        capacity_factor=capacity_factor,
        expert=moekit.ExpertConfig(bias=True),
    )


def test_registered_with_its_own_parameters():
    moe = make_moe()
    assert isinstance(moe.router, AttentionRouter)
    shapes = {n: tuple(p.shape) for n, p in moe.router.named_parameters()}
    assert shapes == {"weight": (6, 8), "query": (15, 8), "key": (15, 8)}


@pytest.mark.parametrize("capacity_factor", [None, 0.75])
def test_matches_reference_float64(capacity_factor):
    torch.manual_seed(0)
    moe = make_moe(capacity_factor)
    x = torch.randn(3, 7, 8, dtype=torch.float64)
    (y, info, gx, grads), (y_ref, info_ref, gx_ref, grads_ref) = against_reference(moe, x)
    assert torch.equal(info.routing.experts, info_ref.routing.experts)
    if capacity_factor is not None:
        assert info.metrics["dropped_fraction"] > 0  # capacity really dropped slots
    assert rel(y, y_ref) < 1e-10 and rel(gx, gx_ref) < 1e-10
    assert {"router.weight", "router.query", "router.key", "experts.w1"} <= set(grads)
    assert set(grads) == set(grads_ref)
    for name in grads:
        assert rel(grads[name], grads_ref[name]) < 1e-10, name
    assert abs(info.aux_loss.item() - info_ref.aux_loss.item()) < 1e-10
    assert torch.allclose(info.metrics["expert_load"], info_ref.metrics["expert_load"])


def test_logits_are_mean_scaled_dot_products_over_heads():
    """One head with identity projections reduces to the linear router over sqrt(A)."""
    torch.manual_seed(1)
    moe = make_moe(heads=1, dim=8, temperature=2.0)
    with torch.no_grad():
        moe.router.query.copy_(torch.eye(8))
        moe.router.key.copy_(torch.eye(8))
    x = torch.randn(5, 8, dtype=torch.float64)
    expected = x @ moe.router.weight.T / math.sqrt(8) / 2.0
    assert torch.allclose(moe.router.logits(x), expected)
    # two heads holding the same projection average to the one-head score
    two = make_moe(heads=2, dim=8, temperature=2.0)
    with torch.no_grad():
        two.router.weight.copy_(moe.router.weight)
        two.router.query.copy_(torch.eye(8).repeat(2, 1))
        two.router.key.copy_(torch.eye(8).repeat(2, 1))
    assert torch.allclose(two.router.logits(x), expected)


def test_float32_and_constellations_match_reference():
    torch.manual_seed(2)
    moe = make_moe(dtype=torch.float32, constellations=[[0, 3], [1, 2, 4], [5]], topk_groups=2)
    x = torch.randn(9, 8)
    y, info = moe(x)
    y_ref, info_ref = moekit.reference.moe_forward(moe, x)
    assert torch.equal(info.routing.experts, info_ref.routing.experts)
    assert rel(y, y_ref) < 1e-5


@pytest.mark.parametrize(
    ("options", "field"),
    [({"heads": 0}, r"router\.options\.heads=0"), ({"dim": 1.5}, r"router\.options\.dim=1\.5")],
)
def test_bad_sizes_name_the_field(options, field):
    with pytest.raises(ValueError, match=field):
        moekit.MoE(moekit.MoEConfig(router=moekit.RouterConfig(kind="attention", options=options)))


def test_trains_the_router_projections():
    torch.manual_seed(3)
    moe = make_moe(dtype=torch.float32).train()
    opt = torch.optim.SGD(moe.router.parameters(), lr=0.1)
    before = moe.router.query.detach().clone()
    y, info = moe(torch.randn(16, 8))
    (y.square().mean() + info.aux_loss).backward()
    opt.step()
    assert not torch.equal(moe.router.query, before)
