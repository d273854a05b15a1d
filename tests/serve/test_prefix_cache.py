"""PrefixCache: longest shared prefix, LRU eviction by positions."""

import torch

from moekit.serve.prefix_cache import PrefixCache

from .conftest import make_model


def _filled(model, prompt):
    cache = model.new_cache()
    model(prompt[None], cache=cache)
    return cache


def test_longest_prefix_and_private_copy():
    model = make_model()
    pc = PrefixCache(capacity_tokens=100, min_prefix=2)
    a = torch.tensor([1, 2, 3, 4, 5, 6])
    pc.insert(a, _filled(model, a))
    hit = pc.lookup(torch.tensor([1, 2, 3, 9, 9]), limit=4)
    assert hit is not None and hit.length == 3 and len(hit.cache) == 3
    ref = _filled(model, a[:3])
    torch.testing.assert_close(hit.cache.layer(0)[0], ref.layer(0)[0])
    hit.cache.append(0, *ref.layer(0))  # growing the copy leaves the stored entry alone
    again = pc.lookup(a, limit=5)
    assert again is not None and again.length == 5  # capped by limit
    assert pc.lookup(torch.tensor([2, 1, 3]), limit=2) is None
    assert pc.lookup(torch.tensor([1, 7]), limit=1) is None  # shorter than min_prefix
    assert pc.stats.hits == 2 and pc.stats.lookups == 4


def test_lru_eviction_by_tokens():
    model = make_model()
    pc = PrefixCache(capacity_tokens=10, min_prefix=2)
    a, b, c = torch.arange(0, 4), torch.arange(10, 14), torch.arange(20, 24)
    for p in (a, b):
        pc.insert(p, _filled(model, p))
    assert pc.lookup(a, limit=3) is not None  # a is now the most recent
    pc.insert(c, _filled(model, c))  # 12 > 10 tokens: evict b, the least recent
    assert pc.contains(a) and not pc.contains(b) and pc.contains(c)
    assert pc.tokens == 8 and pc.stats.evictions == 1
    big = torch.arange(30, 42)
    pc.insert(big, _filled(model, big))  # larger than the whole cache: not stored
    assert not pc.contains(big) and pc.tokens == 8
