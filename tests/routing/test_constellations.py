"""Expert constellations: co-activation counts, clustering, and routing limited to clusters."""

import pytest
import torch
from tests.oracle import against_reference, rel
from tests.oracle import make_moe as oracle_moe

import moekit
from moekit.routing.base import group_limited, membership_limited, membership_mask

PLANTED = [[0, 4], [1, 5], [2, 3]]


def make_moe(capacity_factor=None, dtype=torch.float64, **router):
    """The oracle's layer over 6 experts; `router` are RouterConfig fields."""
    router = moekit.RouterConfig(**router)
    return oracle_moe(router, dtype=dtype, n_experts=6, capacity_factor=capacity_factor)


def test_membership_rule_equals_group_limited_on_equal_groups():
    torch.manual_seed(0)
    scores = torch.rand(50, 12)
    members = membership_mask([list(range(g * 3, g * 3 + 3)) for g in range(4)], 12)
    for keep in (1, 2, 3):
        expected = group_limited(scores, 4, keep)
        assert torch.equal(membership_limited(scores, members, keep), expected)


def test_membership_rule_on_uneven_groups():
    scores = torch.tensor([[0.30, 0.05, 0.25, 0.10, 0.20, 0.10]])
    members = membership_mask([[0, 5], [1, 2, 3], [4]], 6)
    # group scores (sum of top-2): [0.40, 0.35, 0.20]
    out = membership_limited(scores, members, 1)
    assert torch.isfinite(out[0]).tolist() == [True, False, False, False, False, True]
    out = membership_limited(scores, members, 2)
    assert torch.isfinite(out[0]).tolist() == [True, True, True, True, False, True]


@pytest.mark.parametrize("capacity_factor", [None, 0.75])
@pytest.mark.parametrize("topk_groups", [1, 2])
def test_topk_with_constellations_matches_reference(capacity_factor, topk_groups):
    torch.manual_seed(1)
    groups = [[5, 0, 3], [1], [2, 4]] if topk_groups == 2 else [[5, 0, 3], [1, 2, 4]]
    moe = make_moe(capacity_factor, constellations=groups, topk_groups=topk_groups)
    x = torch.randn(4, 6, 8, dtype=torch.float64)
    (y, info, gx, grads), (y_ref, info_ref, gx_ref, grads_ref) = against_reference(moe, x)
    assert torch.equal(info.routing.experts, info_ref.routing.experts)
    assert set(grads) == set(grads_ref) and "router.weight" in grads
    for a, b in ((y, y_ref), (gx, gx_ref), *((grads[n], grads_ref[n]) for n in grads)):
        assert rel(a, b) < 1e-10
    # every token stays inside at most topk_groups constellations
    label = {e: g for g, members in enumerate(groups) for e in members}
    for row in moe.router(x.reshape(-1, 8)).experts.tolist():
        assert len({label[e] for e in row}) <= topk_groups


def test_unlimited_constellations_change_nothing():
    torch.manual_seed(2)
    plain = make_moe()
    grouped = make_moe(constellations=[[0, 1], [2, 3], [4, 5]], topk_groups=3)
    grouped.load_state_dict(plain.state_dict())
    x = torch.randn(20, 8, dtype=torch.float64)
    assert torch.equal(plain(x)[0], grouped(x)[0])


def test_coactivation_counts_tokens_choosing_both_experts():
    torch.manual_seed(3)
    moe = make_moe()
    assert not hasattr(moe, "coactivation") and "coactivation" not in moe.state_dict()
    cfg = moekit.MoEConfig(
        d_model=8, d_hidden=6, n_experts=6, k=2, backend="torch", track_coactivation=True
    )
    moe = moekit.MoE(cfg).eval()
    x = torch.randn(30, 8)
    _, info = moe(x)
    moe.train()
    _, info2 = moe(x)
    expected = torch.zeros(6, 6)
    for row in info.routing.experts.tolist() + info2.routing.experts.tolist():
        for i in row:
            for j in row:
                expected[i, j] += 1
    assert torch.equal(moe.coactivation, expected)
    assert moe.coactivation.diagonal().sum() == 2 * 30 * 2
    assert "coactivation" in moe.state_dict()


def test_coactivation_ignores_empty_slots_of_expert_choice():
    cfg = moekit.MoEConfig(
        d_model=8,
        d_hidden=4,
        n_experts=4,
        k=1,
        router=moekit.RouterConfig(kind="expert_choice"),
        backend="torch",
        track_coactivation=True,
    )
    moe = moekit.MoE(cfg)
    _, info = moe(torch.randn(8, 8))
    chose = torch.zeros(8, 4)
    for t, row in enumerate(info.routing.experts.tolist()):
        for e in row:
            if e >= 0:
                chose[t, e] = 1
    assert torch.equal(moe.coactivation, chose.T @ chose)


def planted_moe():
    """Experts of one planted cluster share a router direction, so tokens pick them together."""
    torch.manual_seed(4)
    cfg = moekit.MoEConfig(
        d_model=8, d_hidden=4, n_experts=6, k=2, backend="torch", track_coactivation=True
    )
    moe = moekit.MoE(cfg)
    directions = torch.eye(8)[:3] * 4.0
    with torch.no_grad():
        for c, members in enumerate(PLANTED):
            for e in members:
                moe.router.weight[e] = directions[c] + 0.3 * torch.randn(8)
    return moe, directions


def test_constellations_recover_planted_clusters():
    moe, directions = planted_moe()
    cluster = torch.randint(0, 3, (400,))
    x = directions[cluster] / 4.0 + 0.2 * torch.randn(400, 8)
    moe(x)
    assert sorted(map(sorted, moe.constellations(3))) == sorted(PLANTED)
    assert moe.constellations(1) == [list(range(6))]
    assert moe.constellations(6) == [[e] for e in range(6)]
    with pytest.raises(ValueError, match="n=7"):
        moe.constellations(7)
    # the clusters plug straight into the router config
    cfg = moekit.MoEConfig(
        d_model=8,
        d_hidden=4,
        n_experts=6,
        k=2,
        router=moekit.RouterConfig(constellations=moe.constellations(3), topk_groups=1),
    )
    routed = moekit.MoE(cfg)
    _, info = routed(torch.randn(50, 8))
    label = {e: g for g, members in enumerate(PLANTED) for e in members}
    assert all(label[a] == label[b] for a, b in info.routing.experts.tolist())


def test_constellations_need_tracking():
    with pytest.raises(ValueError, match="track_coactivation"):
        make_moe().constellations(2)


@pytest.mark.parametrize(
    ("router", "layer", "match"),
    [
        ({"constellations": [[0, 1], [2, 3]]}, {}, "partition"),
        ({"constellations": [[0, 1, 2], [2, 3, 4, 5]]}, {}, "distinct"),
        ({"constellations": [[0], [1, 2, 3, 4, 5]], "topk_groups": 1}, {"k": 2}, "k=2 exceeds"),
        ({"constellations": [[0, 1, 2], [3, 4, 5]], "kind": "sigmoid"}, {}, "kind"),
        ({"constellations": [[0, 1, 2], [3, 4, 5]], "topk_groups": 3}, {}, "topk_groups"),
    ],
)
def test_bad_constellations_are_rejected(router, layer, match):
    with pytest.raises(ValueError, match=match):  # the kind is checked where the layer is built
        moekit.MoE(moekit.MoEConfig(n_experts=6, router=moekit.RouterConfig(**router), **layer))


def test_config_round_trip_with_constellations():
    cfg = moekit.MoEConfig(
        n_experts=6, router=moekit.RouterConfig(constellations=[[0, 4], [1, 2, 3, 5]])
    )
    assert moekit.MoEConfig.from_dict(cfg.to_dict()) == cfg
