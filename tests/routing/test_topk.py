import torch

import moekit
from moekit.routing.base import group_limited


def _router(**kw):
    cfg = moekit.MoEConfig(
        d_model=4, d_hidden=4, n_experts=8, k=kw.pop("k", 2), router=moekit.RouterConfig(**kw)
    )
    return moekit.MoE(cfg).router


def test_renormalize_default_and_off():
    torch.manual_seed(0)
    x = torch.randn(10, 4)
    on = _router()(x)
    assert torch.allclose(on.weights.sum(-1), torch.ones(10))
    r = _router(renormalize=False)
    r.weight.data = _router().weight.data
    raw = r(x)
    probs = torch.softmax(x @ r.weight.T, -1)
    assert torch.allclose(raw.weights, probs.gather(1, raw.experts))
    assert bool((raw.weights.sum(-1) < 1).all())


def test_temperature_sharpens():
    torch.manual_seed(1)
    x = torch.randn(50, 4)
    raw = {"k": 1, "renormalize": False}  # top-1 renormalized would weigh 1.0 at any temperature
    hot, cold = _router(temperature=10.0, **raw), _router(temperature=0.1, **raw)
    cold.weight.data = hot.weight.data
    assert cold(x).weights.mean() > hot(x).weights.mean()


def test_group_limited_keeps_best_groups():
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.0, 0.5, 0.5, 0.2, 0.1]])
    out = group_limited(scores, n_groups=4, topk_groups=2)
    # group sums of top-2: [1.7, 0.1, 1.0, 0.3] -> groups 0 and 2 survive
    assert torch.isinf(out[0, [2, 3, 6, 7]]).all()
    assert torch.equal(out[0, [0, 1, 4, 5]], scores[0, [0, 1, 4, 5]])


def test_top1_renormalized_weighs_one_like_mixtral_and_raw_without():
    torch.manual_seed(3)
    x = torch.randn(12, 4)
    on, off = _router(k=1), _router(k=1, renormalize=False)
    off.weight.data = on.weight.data
    assert torch.equal(on(x).weights, torch.ones(12, 1))
    probs = torch.softmax(x @ on.weight.T, -1)
    assert torch.allclose(off(x).weights[:, 0], probs.max(-1).values)  # Switch Transformer
