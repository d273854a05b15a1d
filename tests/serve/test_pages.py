"""PagePool: refcounts, cached prompt blocks found by chained hashes, LRU eviction."""

import pytest
import torch

from moekit.serve.pages import SCRATCH, OutOfPages, PagePool, block_hashes


def test_block_hashes_chain_the_whole_prefix():
    a = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 9])
    b = torch.tensor([1, 2, 3, 4, 5, 6, 0, 0])
    c = torch.tensor([9, 2, 3, 4, 5, 6, 7, 8])
    ha, hb, hc = (block_hashes(x, 2) for x in (a, b, c))
    assert len(ha) == 4 and len(hb) == 4  # full blocks only
    assert ha[:3] == hb[:3] and ha[3] != hb[3]
    assert all(x != y for x, y in zip(ha, hc, strict=True))  # an earlier block differs
    vectors = torch.arange(12.0).view(6, 2)
    same = vectors.clone()
    same[5, 1] += 1e-6  # after the last full block of 4: ignored
    assert block_hashes(vectors, 4) == block_hashes(same, 4)
    same[0, 0] += 1e-6  # one ulp-sized change in the first block: a different prefix
    assert block_hashes(vectors, 4) != block_hashes(same, 4)
    assert block_hashes(torch.tensor([1]), 4) == []


def test_refcounts_and_the_cache_of_unheld_blocks():
    pool = PagePool(5, cache_pages=2)
    pages = [pool.alloc() for _ in range(4)]
    assert sorted(pages) == [1, 2, 3, 4] and SCRATCH not in pages
    with pytest.raises(OutOfPages):
        pool.alloc()
    pool.register(pages[0], b"h0")
    pool.register(pages[1], b"h1")
    pool.register(pages[2], b"h0")  # the first page to keep a block wins
    assert pool.match([b"h0", b"h1", b"h2"]) == [pages[0], pages[1]]
    pool.hold(pages[0])  # a second row shares it
    pool.drop(pages[0])
    assert pool.refs[pages[0]] == 1 and pool.available == 0
    for p in pages:
        pool.drop(p)
    # unheld: pages[0], pages[1] keep their blocks (cached); the others are free
    assert pool.available == 4 and list(pool.cached) == [pages[0], pages[1]]
    assert pool.match([b"h0", b"h1"]) == [pages[0], pages[1]]
    pool.hold(pages[1])  # a hit takes it out of the cache
    assert list(pool.cached) == [pages[0]] and pool.held == 1
    for _ in range(2):  # free pages first, then the least recently used cached one
        pool.alloc()
    assert pool.match([b"h0"]) == [pages[0]] and pool.stats.evictions == 0
    assert pool.alloc() == pages[0] and pool.match([b"h0"]) == []
    assert pool.stats.evictions == 1


def test_cache_bound_and_off():
    pool = PagePool(8, cache_pages=1)
    a, b = pool.alloc(), pool.alloc()
    pool.register(a, b"a")
    pool.register(b, b"b")
    pool.drop(a)
    pool.drop(b)  # two cached pages > 1: the older one is freed
    assert list(pool.cached) == [b] and pool.match([b"a"]) == [] and pool.stats.evictions == 1
    off = PagePool(4, cache_pages=0)
    page = off.alloc()
    off.register(page, b"x")
    off.drop(page)
    assert off.match([b"x"]) == [] and off.available == 3
    off.clear()
    assert off.available == 3 and off.reserved == 0
