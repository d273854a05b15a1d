"""PagedKVCache: rows of different lengths, shared prefix pages and padding, in one forward."""

import pytest
import torch

from moekit.model import AttentionCache
from moekit.serve.config import EngineConfig
from moekit.serve.paged import PagedKVCache, kv_budget, page_bytes
from moekit.serve.pages import block_hashes

from .conftest import make_model

PAGE = 4


def _feed(model, kv, rows, chunks, static=False):
    """One forward storing chunks[i] (tokens) in rows[i], padded to the longest."""
    counts = [len(c) for c in chunks]
    x = torch.zeros(len(chunks), max(counts), dtype=torch.long)
    for i, c in enumerate(chunks):
        x[i, : len(c)] = c
    kv.extend(rows, counts)
    if static:
        view = kv.static_view(torch.tensor(rows), torch.tensor(counts))
    else:
        view = kv.view(rows, counts)
    assert isinstance(view, AttentionCache)
    out = model(x, cache=view).out
    kv.commit(rows, counts)
    return out


@pytest.mark.parametrize("static", [False, True])
def test_padded_rows_with_a_shared_prefix_match_full_forwards(static):
    torch.manual_seed(0)
    model = make_model()
    kv = PagedKVCache(model, n_rows=3, n_pages=64, page=PAGE, cache_pages=8)
    shared = torch.randint(0, 256, (8,))  # two full pages
    tails = [torch.randint(0, 256, (n,)) for n in (5, 1, 3)]
    rows = [kv.open(kv.pages_for(20)) for _ in range(3)]
    _feed(model, kv, [rows[0]], [shared])
    kv.register(rows[0], block_hashes(shared, PAGE))
    pages = kv.pool.match(block_hashes(torch.cat([shared, tails[1]]), PAGE))
    assert len(pages) == 2
    kv.reuse(rows[1], pages)  # row 1 starts from row 0's pages: nothing copied
    assert kv.length(rows[1]) == 8 and kv.pool.refs[pages[0]] == 2
    chunks = [tails[0], tails[1], torch.cat([shared, tails[2]])]
    out = _feed(model, kv, rows, chunks, static)  # [3, 11, V]: row 1 holds 1 real position
    prompts = [torch.cat([shared, t]) for t in tails]
    for i, p in enumerate(prompts):
        ref = model(p[None]).out[0, -len(chunks[i]) :]
        torch.testing.assert_close(out[i, : len(chunks[i])], ref, atol=1e-4, rtol=1e-4)
    assert [kv.length(r) for r in rows] == [13, 9, 11]
    assert kv.lengths[rows].tolist() == [13, 9, 11]  # padding did not count
    nxt = torch.randint(0, 256, (3,))  # one decode step on every row
    out = _feed(model, kv, rows, [t[None] for t in nxt], static)
    for i, p in enumerate(prompts):
        ref = model(torch.cat([p, nxt[i : i + 1]])[None]).out[0, -1]
        torch.testing.assert_close(out[i, 0], ref, atol=1e-4, rtol=1e-4)


def test_reservations_rows_and_pages_come_back():
    model = make_model()
    kv = PagedKVCache(model, n_rows=2, n_pages=40, page=PAGE, cache_pages=0)
    M = kv.row_pages  # 64 / 4 = 16 pages hold a full row
    assert kv.can_open(M) and not kv.can_open(40)
    a = kv.open(M)
    b = kv.open(20)
    assert kv.pool.reserved == M + 20 and not kv.can_open(1)  # no row left
    kv.close(b)
    assert kv.pool.reserved == M and kv.can_open(39 - M) and not kv.can_open(40 - M)
    _feed(model, kv, [a], [torch.arange(10)])
    assert kv.pool.held == 3 and kv.pool.reserved == M - 3  # allocated out of the promise
    kv.truncate(a)
    assert kv.pool.held == 0 and kv.length(a) == 0 and kv.lengths[a] == 0
    assert kv.reserve(a, M) and kv.pool.reserved == M and not kv.reserve(a, 40)
    kv.close(a)
    assert kv.pool.reserved == 0 and kv.free_rows == 2 and kv.block_table.eq(0).all()


def test_sizing_from_kv_memory():
    model = make_model()
    per_page = page_bytes(model, 16)
    assert per_page == 2 * 2 * 16 * 2 * 16 * 4  # K and V, 2 layers, 16 positions, 2x16, fp32
    cpu = torch.device("cpu")
    assert kv_budget("1MiB", cpu) == 1 << 20 and kv_budget("2e6", cpu) == 2_000_000
    with pytest.raises(ValueError, match="CUDA"):
        kv_budget("0.5", cpu)
    with pytest.raises(ValueError, match="kv_memory"):
        EngineConfig(kv_memory="lots")
    with pytest.raises(ValueError, match="raise kv_memory"):
        PagedKVCache(model, 1, 4, 16, 0)  # max_seq_len 64 needs 4 pages + scratch
