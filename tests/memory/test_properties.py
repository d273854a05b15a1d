"""Query results against a brute-force float64 cosine oracle."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from moekit.memory import KnowledgeStore
from moekit.memory._index import faiss_available


def _fix_zero_rows(x: np.ndarray) -> np.ndarray:
    x = x.copy()
    x[np.abs(x).max(axis=1) < 1e-3, 0] = 1.0
    return x


@st.composite
def store_case(draw):
    dim = draw(st.integers(1, 6))
    n = draw(st.integers(0, 25))
    elems = st.floats(-4, 4, width=32, allow_subnormal=False)
    x = _fix_zero_rows(draw(arrays(np.float32, (n, dim), elements=elems)))
    q = _fix_zero_rows(draw(arrays(np.float32, (3, dim), elements=elems)))
    layers = draw(st.lists(st.integers(0, 2), min_size=n, max_size=n))
    top_k = draw(st.integers(1, 8))
    layer = draw(st.one_of(st.none(), st.integers(0, 2)))
    return x, q, layers, top_k, layer


def _oracle(x, q, layers, layer):
    """float64 cosines [Q, N], -inf outside the layer filter."""
    xn = x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    qn = q.astype(np.float64) / np.linalg.norm(q.astype(np.float64), axis=1, keepdims=True)
    sims = qn @ xn.T
    if layer is not None:
        sims[:, np.asarray(layers) != layer] = -np.inf
    return sims


@settings(max_examples=40, deadline=None)
@given(store_case())
def test_query_matches_brute_force(case):
    x, q, layers, top_k, layer = case
    with tempfile.TemporaryDirectory() as d, KnowledgeStore(Path(d) / "kb", x.shape[1]) as s:
        ids = s.add_many(x, [[i] for i in range(len(x))], layers=layers, dedup=False)
        sims = _oracle(x, q, layers, layer)
        results = s.query_many(q, top_k=top_k, layer=layer)
        for qi, hits in enumerate(results):
            finite = np.sort(sims[qi][np.isfinite(sims[qi])])[::-1]
            want = finite[:top_k]
            got = np.array([h.similarity for h in hits])
            assert len(hits) == len(want)
            np.testing.assert_allclose(got, want, atol=1e-5)  # best first, same values
            for h in hits:  # each hit's similarity is its own oracle cosine
                row = ids.index(h.node_id)
                assert abs(sims[qi, row] - h.similarity) < 1e-5
                assert h.experts == (row,) and (layer is None or h.layer == layer)
            assert len({h.node_id for h in hits}) == len(hits)


@settings(max_examples=25, deadline=None)
@given(store_case(), st.floats(0.3, 1.0))
def test_add_many_equals_sequential_add(case, threshold):
    x, _, layers, _, _ = case
    dim = x.shape[1]
    # exact ties (a row equally close to two stored nodes) may merge into either; the
    # property is about everything else
    sims = _oracle(x, x, layers, None)
    for i in range(len(x)):
        close = np.sort(sims[i, :i][sims[i, :i] >= threshold - 1e-5])[::-1]
        assume(len(close) < 2 or close[0] - close[1] > 1e-5)
    with tempfile.TemporaryDirectory() as d:
        with KnowledgeStore(Path(d) / "a", dim, dedup_threshold=threshold) as a:
            seq = [a.add(xi, [i], la) for i, (xi, la) in enumerate(zip(x, layers, strict=True))]
            seq_nodes = [(n.count, n.experts) for n in map(a.get, sorted(set(seq)))]
        with KnowledgeStore(Path(d) / "b", dim, dedup_threshold=threshold) as b:
            bat = b.add_many(x, [[i] for i in range(len(x))], layers=layers)
            bat_nodes = [(n.count, n.experts) for n in map(b.get, sorted(set(bat)))]
    assert bat == seq and bat_nodes == seq_nodes


@pytest.mark.skipif(not faiss_available(), reason="faiss is optional")
def test_faiss_index_agrees_with_torch(tmp_path):
    rng = np.random.default_rng(3)
    x, q = rng.normal(size=(500, 16)), rng.normal(size=(10, 16))
    out = []
    for index in ("torch", "faiss"):
        with KnowledgeStore(tmp_path / index, 16, max_nodes=450, index=index) as s:
            s.add_many(x[:400], [[i % 7] for i in range(400)], dedup=False)
            s.add_many(x[400:], [[i % 7] for i in range(100)])  # evictions reorder rows
            out.append([[h.node_id for h in hits] for hits in s.query_many(q, top_k=5)])
    assert out[0] == out[1]
