import torch

import moekit
from moekit.routing.sinkhorn import balanced_topk


def test_loads_within_one_percent_of_the_mean():
    torch.manual_seed(0)
    T, E = 4096, 8
    for k in (1, 2):
        logits = torch.randn(T, E)
        experts = balanced_topk(logits, k, iters=50, tau=0.05, candidates=None)
        load = torch.bincount(experts.reshape(-1), minlength=E).float()
        target = T * k / E
        assert ((load - target).abs() / target).max() < 0.01, load


def test_candidates_restrict_choices():
    torch.manual_seed(1)
    logits = torch.randn(256, 8)
    experts = balanced_topk(logits, 1, iters=30, tau=0.05, candidates=2)
    top2 = logits.topk(2, -1).indices
    assert bool((experts == top2).any(-1).all())


def test_layer_weights_come_from_the_softmax():
    torch.manual_seed(2)
    cfg = moekit.MoEConfig(
        d_model=8,
        d_hidden=4,
        n_experts=4,
        k=2,
        router=moekit.RouterConfig(kind="sinkhorn", renormalize=False),
    )
    moe = moekit.MoE(cfg).eval()
    x = torch.randn(64, 8)
    r = moe.router(x)
    probs = torch.softmax(x @ moe.router.weight.T, -1)
    assert torch.allclose(r.weights, probs.gather(1, r.experts))
    assert bool((r.experts[:, 0] != r.experts[:, 1]).all())
