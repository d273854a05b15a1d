"""Batched per-row sampling: each row its own settings and seed, none depending on the others."""

import torch

from moekit.model import RowSampling, sample_rows
from moekit.model.sampling import seed_key

LOGITS = torch.tensor([4.0, 3.0, 2.0, -5.0, -6.0])  # p(0)=0.66, p(1)=0.24, p(2)=0.09


def _rows(n, temperature=1.0, top_k=5, top_p=1.0, seed=0, start=0):
    """Settings for n rows of one request drawing its tokens start..start+n-1."""
    return dict(
        temperature=torch.full((n,), temperature),
        top_k=torch.full((n,), top_k),
        top_p=torch.full((n,), top_p),
        keys=torch.full((n,), seed_key(seed)),
        draws=torch.arange(start, start + n),
    )


def test_frequencies_follow_the_softmax():
    n = 20000
    tokens = sample_rows(LOGITS.repeat(n, 1), **_rows(n, temperature=2.0))
    freq = torch.bincount(tokens, minlength=5).float() / n
    torch.testing.assert_close(freq, (LOGITS / 2.0).softmax(-1), atol=0.015, rtol=0)


def test_top_k_top_p_and_greedy_per_row():
    n = 600
    settings = [_rows(n, top_k=2), _rows(n, top_p=0.7), _rows(n, temperature=0.0), _rows(n)]
    batch = {key: torch.cat([s[key] for s in settings]) for key in settings[0]}
    tokens = sample_rows(LOGITS.repeat(4 * n, 1), **batch).view(4, n)
    assert set(tokens[0].tolist()) == {0, 1}  # top_k=2
    assert set(tokens[1].tolist()) == {0, 1}  # top_p=0.7 keeps exactly tokens 0 and 1
    assert tokens[2].eq(0).all()  # temperature 0: argmax
    assert set(tokens[3].tolist()) >= {0, 1, 2}  # unrestricted


def test_a_row_depends_on_its_seed_and_draw_only():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    kw = _rows(6, seed=7, start=3)
    alone = sample_rows(logits, **kw)
    order = torch.tensor([5, 3, 0, 1, 4, 2])
    shuffled = sample_rows(logits[order], **{k: v[order] for k, v in kw.items()})
    assert torch.equal(shuffled, alone[order])
    other = sample_rows(logits, **_rows(6, seed=8, start=3))
    assert not torch.equal(other, alone)
    assert seed_key(1) != seed_key(1 + 2**32)  # high bits of a seed count too


def test_row_sampling_counts_draws_and_follows_moves():
    rows = RowSampling(3, vocab=5, device=torch.device("cpu"))
    rows.set(0, 0.0, None, None, seed=1)
    logits = LOGITS.repeat(2, 1)
    assert rows.sample(logits[:1]).tolist() == [0]  # an all-greedy batch
    assert rows.draws.tolist() == [0, 0, 0]
    rows.set(1, 1.0, 2, None, seed=3)
    first = rows.sample(logits)
    assert first[0] == 0 and first[1] in (0, 1) and rows.draws.tolist() == [1, 1, 0]
    rows.move(1, 0)  # row 1's request now decodes in row 0, with its draws so far
    assert rows.draws[0] == 1 and rows.top_k[0] == 2 and rows.keys[0] == seed_key(3)
    again = sample_rows(logits[:1], **_rows(1, top_k=2, seed=3, start=1))
    assert torch.equal(rows.sample(logits[:1]), again)
