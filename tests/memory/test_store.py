"""KnowledgeStore: dedup, links, eviction, persistence and argument checks."""

from __future__ import annotations

import math
import sqlite3

import numpy as np
import pytest
import torch

from moekit.memory import KnowledgeStore

DIM = 8


def e(i: int, dim: int = DIM) -> torch.Tensor:
    """Basis vector e_i."""
    out = torch.zeros(dim)
    out[i] = 1.0
    return out


def at_cos(c: float, a: int = 0, b: int = 1) -> torch.Tensor:
    """A unit vector whose cosine with e_a is exactly c (it lies in the e_a, e_b plane)."""
    return c * e(a) + math.sqrt(1.0 - c * c) * e(b)


@pytest.fixture
def store(tmp_path):
    with KnowledgeStore(tmp_path / "kb.sqlite", dim=DIM) as s:
        yield s


def test_merge_above_threshold_and_not_below(store):
    a = store.add(e(0), [1, 2], layer=0, step=5, metadata={"k": 1, "nested": {"x": 1}})
    assert store.add(at_cos(0.9), [2, 7], layer=0, step=9, metadata={"nested": {"y": 2}}) == a
    b = store.add(at_cos(0.8), [3], layer=0)  # 0.8 < 0.85: its own node
    assert b != a and len(store) == 2
    node = store.get(a)
    assert node.count == 2 and node.experts == (1, 2, 7)
    assert node.metadata == {"k": 1, "nested": {"y": 2}}  # shallow merge, new keys win
    assert node.step == 5  # the first step and embedding are kept
    torch.testing.assert_close(node.embedding, e(0))
    assert store.get(b).count == 1 and store.get(b).experts == (3,)


def test_merge_picks_the_nearest_of_several_matches(tmp_path):
    with KnowledgeStore(tmp_path / "kb.sqlite", dim=DIM, dedup_threshold=0.5) as s:
        a, b = s.add(e(0), [0]), s.add(e(1), [1])
        w = 0.6 * e(0) + 0.8 * e(1)  # cos 0.6 with a, 0.8 with b: both over the threshold
        assert s.add(w, [5]) == b
        assert (s.get(a).count, s.get(b).count) == (1, 2)
        assert s.get(a).experts == (0,) and s.get(b).experts == (1, 5)


def test_dedup_scope_is_the_layer_or_any_layer_for_none(store):
    a = store.add(e(0), [1], layer=0)
    b = store.add(e(0), [1], layer=1)  # same vector, other layer: not merged
    assert b != a
    assert store.add(e(0), [4], layer=None) in (a, b)  # no layer: any layer matches
    c = store.add(e(2), [1], layer=None)
    assert store.add(e(2), [1], layer=3) != c  # a layered add ignores layer-less nodes
    assert len(store) == 4


def test_threshold_one_merges_only_identical_directions(tmp_path):
    with KnowledgeStore(tmp_path / "kb.sqlite", dim=DIM, dedup_threshold=1.0) as s:
        a = s.add(torch.tensor([0.3, -1.7, 2.0, 0.1, 0, 0, 0, 5.0]), [0])
        assert s.add(torch.tensor([0.6, -3.4, 4.0, 0.2, 0, 0, 0, 10.0]), [0]) == a  # 2x
        assert s.add(at_cos(0.9999), [0]) != a
        assert len(s) == 2


def test_add_many_matches_sequential_adds(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, DIM))
    x = np.concatenate([c + 0.15 * rng.normal(size=(6, DIM)) for c in centres])
    x = x[rng.permutation(len(x))].astype(np.float32)
    experts = [[int(i % 5), int(i % 3)] for i in range(len(x))]
    layers = [int(i % 2) for i in range(len(x))]
    with KnowledgeStore(tmp_path / "a.sqlite", DIM, dedup_threshold=0.9) as seq:
        ids_seq = [seq.add(xi, ex, la) for xi, ex, la in zip(x, experts, layers, strict=True)]
        nodes_seq = [(n.count, n.experts, n.layer) for n in map(seq.get, sorted(set(ids_seq)))]
    with KnowledgeStore(tmp_path / "b.sqlite", DIM, dedup_threshold=0.9) as bat:
        ids_bat = bat.add_many(x, experts, layers)
        nodes_bat = [(n.count, n.experts, n.layer) for n in map(bat.get, sorted(set(ids_bat)))]
    assert ids_bat == ids_seq
    assert len(set(ids_seq)) < len(x)  # the data really did merge
    assert nodes_bat == nodes_seq


def test_add_many_without_dedup_keeps_every_row(store):
    ids = store.add_many(torch.stack([e(0)] * 3), [[1]] * 3, dedup=False)
    assert len(set(ids)) == 3 and len(store) == 3


def test_query_orders_best_first_and_filters_layers(store):
    cosines = [0.1, 0.5, 0.7, 0.3]  # each in its own plane, so no two nodes merge
    ids = [store.add(at_cos(c, 0, i + 1), [i], layer=i % 2) for i, c in enumerate(cosines)]
    hits = store.query(e(0), top_k=3)
    assert [h.node_id for h in hits] == [ids[2], ids[1], ids[3]]
    assert [round(h.similarity, 6) for h in hits] == [0.7, 0.5, 0.3]
    assert hits[0].experts == (2,) and hits[0].layer == 0 and hits[0].count == 1
    assert [h.node_id for h in store.query(e(0), top_k=10, layer=1)] == [ids[1], ids[3]]
    assert len(store.query(e(0), top_k=10)) == 4
    many = store.query_many(torch.stack([e(0), -e(0)]), top_k=1, track=False)
    assert [m[0].node_id for m in many] == [ids[2], ids[0]]


def test_query_on_empty_store_returns_nothing(store):
    assert store.query(e(0)) == []


def test_query_tracks_hits_unless_disabled(store):
    a = store.add(e(0), [1])
    store.query(e(0), top_k=1)
    store.query(e(0), top_k=1)
    store.query(e(0), top_k=1, track=False)
    assert store.get(a).hits == 2


def test_neighbors_weight_is_number_of_shared_experts(store):
    a = store.add(e(0), [1, 2, 3])
    b = store.add(e(1), [2, 3])
    c = store.add(e(2), [3, 9])
    d = store.add(e(3), [7])
    assert store.neighbors(a) == [(b, 2), (c, 1)]
    assert store.neighbors(b) == [(a, 2), (c, 1)]
    assert store.neighbors(a, limit=1) == [(b, 2)]
    assert store.neighbors(d) == []
    assert store.add(e(0), [7]) == a  # the merge links a to d
    assert store.neighbors(d) == [(a, 1)]
    with pytest.raises(KeyError):
        store.neighbors(12345)


def test_eviction_drops_least_used_then_least_recent(tmp_path):
    with KnowledgeStore(tmp_path / "kb.sqlite", DIM, max_nodes=3) as s:
        a, b, c = s.add(e(0), [1]), s.add(e(1), [1]), s.add(e(2), [1])
        s.query(e(1), top_k=1)  # b: usage 2
        d = s.add(e(3), [1])  # a and c have usage 1, a is older
        assert s.get(a) is None and len(s) == 3 and a not in s
        assert s.add(e(2), [2]) == c  # merge: c usage 2, most recent
        f = s.add(e(4), [1])  # d is now the only usage-1 node besides f itself
        assert s.get(d) is None and {b, c, f} == set(s._cache.ids())
        edges = s._db.execute("SELECT src, dst FROM edges").fetchall()
        assert {x for pair in edges for x in pair} == {b, c, f}
        assert sorted(s.neighbors(f)) == [(b, 1), (c, 1)]
        assert [h.node_id for h in s.query(e(0), top_k=5)] != [] and s.get(a) is None


def test_new_node_is_not_evicted_by_its_own_add(tmp_path):
    with KnowledgeStore(tmp_path / "kb.sqlite", DIM, max_nodes=2) as s:
        a, b = s.add(e(0), [1]), s.add(e(1), [1])
        for _ in range(3):
            s.query(e(0), top_k=1)
        s.query(e(1), top_k=1)
        c = s.add(e(2), [1])  # lowest usage, but protected: b (usage 2 < 4) goes
        assert s.get(c) is not None and s.get(b) is None and s.get(a) is not None


def test_batch_larger_than_max_nodes_keeps_the_latest_rows(tmp_path):
    with KnowledgeStore(tmp_path / "kb.sqlite", DIM, max_nodes=3) as s:
        ids = s.add_many(torch.eye(DIM)[:5], [[0]] * 5)
        assert sorted(s._cache.ids()) == ids[2:]
        rows = s._db.execute("SELECT COUNT(*) FROM nodes").fetchone()[0]
        assert rows == 3


def test_reopen_gives_identical_results(tmp_path):
    path = tmp_path / "kb.sqlite"
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(300, DIM, generator=gen)
    queries = torch.randn(20, DIM, generator=gen)
    with KnowledgeStore(path, DIM, max_nodes=250) as s:
        s.add_many(x[:200], [[i % 4] for i in range(200)], layers=[i % 3 for i in range(200)])
        for i in range(200, 300):  # interleave evictions so cache rows get reordered
            s.add(x[i], [i % 4], layer=i % 3, metadata={"i": i})
        before = s.query_many(queries, top_k=7, track=False)
        before_l1 = s.query_many(queries, top_k=7, layer=1, track=False)
        n = len(s)
    with KnowledgeStore(path, DIM, max_nodes=250) as s:
        assert len(s) == n
        assert s.query_many(queries, top_k=7, track=False) == before
        assert s.query_many(queries, top_k=7, layer=1, track=False) == before_l1


def test_ids_are_never_reused_after_eviction(tmp_path):
    path = tmp_path / "kb.sqlite"
    with KnowledgeStore(path, DIM, max_nodes=1) as s:
        a = s.add(e(0), [1])
        b = s.add(e(1), [1])
    with KnowledgeStore(path, DIM, max_nodes=1) as s:
        c = s.add(e(2), [1])
    assert a < b < c


def test_two_connections_see_each_others_writes(tmp_path):
    path = tmp_path / "kb.sqlite"
    with KnowledgeStore(path, DIM) as s1, KnowledgeStore(path, DIM) as s2:
        a = s1.add(e(0), [1])
        assert len(s2) == 1 and s2.query(e(0), top_k=1)[0].node_id == a
        assert s2.add(at_cos(0.95), [2]) == a  # s2's dedup sees s1's node
        assert s1.get(a).count == 2


def test_store_is_a_valid_wal_database(tmp_path):
    path = tmp_path / "kb.sqlite"
    with KnowledgeStore(path, DIM) as s:
        s.add(e(0), [1])
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    blob = con.execute("SELECT embedding FROM nodes").fetchone()[0]
    assert np.frombuffer(blob, dtype="<f4").tolist() == e(0).tolist()
    con.close()


def test_closed_store_refuses_work(tmp_path):
    s = KnowledgeStore(tmp_path / "kb.sqlite", DIM)
    s.close()
    s.close()
    with pytest.raises(ValueError, match="closed"):
        s.add(e(0), [1])


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"dim": 0}, "dim"),
        ({"dim": 2.5}, "dim"),
        ({"dedup_threshold": 0.0}, "dedup_threshold"),
        ({"dedup_threshold": 1.5}, "dedup_threshold"),
        ({"dedup_threshold": float("nan")}, "dedup_threshold"),
        ({"max_nodes": 0}, "max_nodes"),
        ({"index": "annoy"}, "index"),
    ],
)
def test_bad_constructor_arguments(tmp_path, kwargs, name):
    args = {"path": tmp_path / "kb.sqlite", "dim": DIM, **kwargs}
    with pytest.raises(ValueError, match=name):
        KnowledgeStore(**args)


def test_reopen_with_another_dim_fails(tmp_path):
    KnowledgeStore(tmp_path / "kb.sqlite", DIM).close()
    with pytest.raises(ValueError, match="dim"):
        KnowledgeStore(tmp_path / "kb.sqlite", DIM + 1)


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda s: s.add(torch.ones(DIM + 1), [1]), "embedding"),
        (lambda s: s.add(torch.ones(2, DIM), [1]), "embedding"),
        (lambda s: s.add(torch.full((DIM,), float("nan")), [1]), "embedding"),
        (lambda s: s.add(torch.full((DIM,), float("inf")), [1]), "embedding"),
        (lambda s: s.add(torch.zeros(DIM), [1]), "embedding"),
        (lambda s: s.add(["a"] * DIM, [1]), "embedding"),
        (lambda s: s.add(e(0), [1, -1]), "experts"),
        (lambda s: s.add(e(0), [1.5]), "experts"),
        (lambda s: s.add(e(0), 3), "experts"),
        (lambda s: s.add(e(0), [1], layer=-2), "layer"),
        (lambda s: s.add(e(0), [1], step="x"), "step"),
        (lambda s: s.add(e(0), [1], metadata=[1]), "metadata"),
        (lambda s: s.add(e(0), [1], metadata={"x": object()}), "metadata"),
        (lambda s: s.add(e(0), [1], metadata={"x": float("nan")}), "metadata"),
        (lambda s: s.add_many(torch.ones(2, DIM), [[1]]), "experts"),
        (lambda s: s.add_many(torch.ones(2, DIM), [[1], [2]], layers=[0]), "layers"),
        (lambda s: s.add_many(torch.ones(DIM), [[1]]), "embeddings"),
        (lambda s: s.query(e(0), top_k=0), "top_k"),
        (lambda s: s.query(torch.ones(3)), "embedding"),
        (lambda s: s.query(e(0), layer=-1), "layer"),
    ],
)
def test_bad_inputs_name_the_argument(store, call, name):
    with pytest.raises(ValueError, match=name):
        call(store)
    assert len(store) == 0  # nothing half-written
