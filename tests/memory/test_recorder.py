"""KnowledgeRecorder / pool_routing: pooling, expert selection and sampling."""

from __future__ import annotations

import pytest
import torch

from moekit.memory import KnowledgeRecorder, KnowledgeStore, pool_routing


def test_pool_routing_means_over_sequence_and_picks_frequent_experts():
    hidden_BSD = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    experts_Tk = torch.tensor([[5, 1], [5, 2], [2, -1], [7, -1], [-1, -1], [0, 7]])
    emb_BD, top = pool_routing(hidden_BSD, experts_Tk)
    torch.testing.assert_close(emb_BD, hidden_BSD.mean(dim=1))
    assert top[0] == [2, 5]  # 5 and 2 twice, 1 once: top_n defaults to k = 2
    assert top[1] == [0, 7]  # 7 twice, then 0; -1 slots ignored
    _, union = pool_routing(hidden_BSD, experts_Tk, mode="union")
    assert union == [[1, 2, 5], [0, 7]]
    _, top1 = pool_routing(hidden_BSD, experts_Tk, top_n=1)
    assert top1 == [[2], [7]]  # a tie between 2 and 5 goes to the lower id


def test_pool_routing_flat_tokens_is_one_sequence():
    hidden_TD = torch.randn(5, 3, dtype=torch.bfloat16)
    emb, experts = pool_routing(hidden_TD, torch.full((5, 2), -1))
    assert emb.shape == (1, 3) and emb.dtype == torch.float32 and experts == [[]]


@pytest.mark.parametrize(
    ("hidden", "experts", "name"),
    [
        (torch.randn(4), torch.zeros(4, 1, dtype=torch.long), "hidden"),
        (torch.randn(2, 3, 4), torch.zeros(5, 1, dtype=torch.long), "experts"),
        (torch.randn(2, 3, 4), torch.zeros(6, 1), "experts"),
    ],
)
def test_pool_routing_rejects_bad_shapes(hidden, experts, name):
    with pytest.raises(ValueError, match=name):
        pool_routing(hidden, experts)


def test_recorder_samples_every_n_calls(tmp_path):
    with KnowledgeStore(tmp_path / "kb", dim=4, dedup_threshold=1.0) as store:
        rec = KnowledgeRecorder(store, every=2)
        gen = torch.Generator().manual_seed(0)
        stored, hiddens = [], []
        for step in range(5):
            hidden = torch.randn(2, 3, 4, generator=gen)
            hiddens.append(hidden)
            experts = torch.randint(0, 4, (6, 2), generator=gen)
            stored.append(rec(hidden, experts, layer=1, step=step))
        assert [len(ids) for ids in stored] == [2, 0, 2, 0, 2]
        assert len(store) == 6 and rec.calls == 5
        node = store.get(stored[2][1])
        assert node.layer == 1 and node.step == 2
        torch.testing.assert_close(node.embedding, hiddens[2][1].mean(dim=0))
    with pytest.raises(ValueError, match="every"):
        KnowledgeRecorder(store, every=0)
