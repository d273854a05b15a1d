import pytest
import torch

from moekit.model import AttentionCache, KVCache, Transformer


def _kv(B, S, fill):
    return torch.full((B, 2, S, 4), float(fill)), torch.full((B, 2, S, 4), -float(fill))


def test_append_grows_and_returns_everything():
    cache = KVCache(n_layers=1)
    for i in range(40):  # past the initial capacity, forcing growth
        k, v = cache.append(0, *_kv(1, 1, i))
    assert len(cache) == 40
    assert k.shape == (1, 2, 40, 4)
    assert torch.equal(k[0, 0, :, 0], torch.arange(40.0))
    assert torch.equal(v, -k)


def test_prefix_select_stack_truncate():
    cache = KVCache(n_layers=2)
    for layer in range(2):
        cache.append(layer, torch.arange(3 * 2 * 5 * 4.0).view(3, 2, 5, 4), torch.zeros(3, 2, 5, 4))
    pre = cache.prefix(3)
    assert len(pre) == 3 and len(cache) == 5
    assert torch.equal(pre.layer(1)[0], cache.layer(1)[0][:, :, :3])
    pre.append(0, *_kv(3, 1, 99))  # the copy is independent of the original
    assert cache.layer(0)[0][:, :, 3].ne(99).all()
    one = cache.select(1)
    assert one.batch_size == 1 and torch.equal(one.layer(0)[0][0], cache.layer(0)[0][1])
    both = KVCache.stack([cache.select(2), cache.select(0)])
    assert torch.equal(both.layer(0)[0], cache.layer(0)[0][[2, 0]])
    cache.truncate(2)
    assert len(cache) == 2
    with pytest.raises(ValueError, match="prefix"):
        cache.prefix(3)
    with pytest.raises(ValueError, match="equal length"):
        KVCache.stack([cache, pre])


def test_prefix_cache_reuse_equals_fresh_prefill(tiny_cfg):
    torch.manual_seed(0)
    model = Transformer(tiny_cfg()).eval()
    prompt = torch.randint(0, 37, (1, 12))
    shared = model.new_cache()
    model(prompt[:, :8], cache=shared)  # a prompt prefix shared by several requests
    reused = shared.prefix(8)
    tail = model(prompt[:, 8:], cache=reused).out
    full = model(prompt).out[:, 8:]
    assert torch.allclose(tail, full, atol=1e-5)


def test_kv_cache_is_an_attention_cache():
    cache = KVCache(n_layers=1)
    assert isinstance(cache, AttentionCache)
    assert cache.positions(2, 3, torch.device("cpu")).tolist() == [0, 1, 2]
    k, v, mask = cache.update(0, *_kv(2, 3, 1))
    assert mask is None and k.shape == (2, 2, 3, 4)
    assert cache.positions(2, 2, torch.device("cpu")).tolist() == [3, 4]
