import torch

from moekit.model import Transformer, sample_next


def test_cached_decoding_equals_recomputation(tiny_cfg):
    torch.manual_seed(0)
    model = Transformer(tiny_cfg()).eval()
    prompt = torch.randint(0, 37, (3, 5))
    cached = model.generate(prompt, 20, temperature=0)
    recomputed = model.generate(prompt, 20, temperature=0, use_cache=False)
    assert torch.equal(cached, recomputed)
    # logits step by step with the cache equal one full forward pass
    cache = model.new_cache()
    steps = [model(cached[:, :5], cache=cache).out]
    steps += [model(cached[:, t : t + 1], cache=cache).out for t in range(5, 25)]
    assert torch.allclose(torch.cat(steps, 1), model(cached).out, atol=1e-5)


def test_sampled_generation_cached_equals_uncached(tiny_cfg):
    torch.manual_seed(0)
    model = Transformer(tiny_cfg()).eval()
    prompt = torch.randint(0, 37, (2, 4))
    kw = dict(temperature=0.8, top_k=10, top_p=0.9)
    a = model.generate(prompt, 15, generator=torch.Generator().manual_seed(1), **kw)
    b = model.generate(
        prompt, 15, generator=torch.Generator().manual_seed(1), use_cache=False, **kw
    )
    assert torch.equal(a, b)


def test_generation_slides_past_max_seq_len(tiny_cfg):
    model = Transformer(tiny_cfg(max_seq_len=8)).eval()
    out = model.generate(torch.zeros(1, 3, dtype=torch.long), 20)
    assert out.shape == (1, 23)


def test_continuous_rollout_cached_equals_uncached(tiny_cfg):
    torch.manual_seed(0)
    model = Transformer(tiny_cfg(vocab_size=None, d_in=2, d_out=2)).eval()
    prompt = torch.randn(2, 6, 2)
    a = model.generate(prompt, 10)
    b = model.generate(prompt, 10, use_cache=False)
    assert a.shape == (2, 16, 2)
    assert torch.equal(a[:, :6], prompt)
    assert torch.allclose(a, b, atol=1e-5)


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, -5.0, -6.0]]).repeat(500, 1)
    gen = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, top_k=2, generator=gen).tolist()) == {0, 1}
    # p(0)=0.66, p(1)=0.24: top_p=0.7 keeps exactly tokens 0 and 1
    assert set(sample_next(logits, 1.0, top_p=0.7, generator=gen).tolist()) == {0, 1}
    assert sample_next(logits, 0.0).eq(0).all()


def test_generation_computes_no_router_loss_or_metric(tiny_cfg, monkeypatch):
    """Losses and metrics are computed when read; generation never reads them."""
    import moekit.layer

    calls = []

    def counted(name):
        real = getattr(moekit.layer, name)
        return lambda *args: calls.append(name) or real(*args)

    for name in ("router_losses", "routing_metrics"):
        monkeypatch.setattr(moekit.layer, name, counted(name))
    torch.manual_seed(0)
    model = Transformer(tiny_cfg()).eval()
    model.generate(torch.randint(0, 37, (2, 4)), 6, temperature=0)
    assert calls == []
    out = model(torch.randint(0, 37, (2, 4)))
    assert out.layers[1].metrics["expert_load"].shape == (4,)
    assert calls == ["router_losses", "routing_metrics"]
