import math

import torch

import moekit


def test_each_expert_takes_exactly_c_best_tokens():
    torch.manual_seed(0)
    T, E, k = 30, 4, 2
    cfg = moekit.MoEConfig(
        d_model=8, d_hidden=4, n_experts=E, k=k, router=moekit.RouterConfig(kind="expert_choice")
    )
    moe = moekit.MoE(cfg).eval()
    x = torch.randn(T, 8)
    r = moe.router(x)
    C = math.ceil(T * k / E)
    probs = torch.softmax(x @ moe.router.weight.T, -1)
    for e in range(E):
        picked = (r.experts[:, e] == e).nonzero().flatten()
        assert picked.numel() == C
        assert set(picked.tolist()) == set(probs[:, e].topk(C).indices.tolist())
    per_token = (r.experts >= 0).sum(-1)
    assert per_token.sum() == C * E  # tokens get 0..E experts
    assert per_token.max() <= E
