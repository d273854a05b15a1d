"""Penalties and logit biases: the batched device path against a naive per-row loop."""

from __future__ import annotations

import asyncio

import torch

from moekit.serve.config import EngineConfig
from moekit.serve.engine import Engine
from moekit.serve.penalties import LogitAdjust
from moekit.serve.sequence import SamplingParams

from .conftest import make_model


def _naive(logits, history, frequency, presence, bias):
    """OpenAI's definition, one row and one token at a time."""
    out = logits.clone().float()
    for j in range(out.shape[0]):
        c = history.count(j)
        out[j] -= c * frequency + (c > 0) * presence
    for token, b in bias:
        out[token] += b
    return out


def test_batched_adjustment_equals_a_per_row_loop():
    torch.manual_seed(0)
    V, N = 11, 6
    adjust = LogitAdjust(N, V, torch.device("cpu"))
    settings = {
        0: (0.5, 0.0, ()),
        2: (0.0, 1.5, ((3, 100.0), (4, -100.0))),
        3: (0.0, 0.0, ()),  # a row without any: unchanged bit for bit
        4: (-1.0, 2.0, ((0, 2.5),)),
        5: (2.0, -0.5, ()),
    }
    for row, (f, p, b) in settings.items():
        adjust.set(row, f, p, b)
    history: dict[int, list[int]] = {row: [] for row in settings}
    for _ in range(8):  # steps: each samples some rows, then counts what they drew
        rows = sorted(torch.randperm(N)[:4].tolist())
        rows = [r for r in rows if r in settings]
        logits = torch.randn(len(rows), V)
        got = adjust.apply(logits, torch.tensor(rows))
        for i, r in enumerate(rows):
            f, p, b = settings[r]
            assert torch.allclose(got[i], _naive(logits[i], history[r], f, p, b), atol=1e-5)
        assert adjust.active(rows) == any(any(settings[r][:2]) or settings[r][2] for r in rows)
        if 3 in rows:
            assert torch.equal(got[rows.index(3)], logits[rows.index(3)])
        tokens = torch.randint(0, V, (len(rows),))
        adjust.count(torch.tensor(rows), tokens)
        for r, t in zip(rows, tokens.tolist(), strict=True):
            history[r].append(t)
    adjust.set(2, 0.0, 0.0, ())  # a new request in the row: counts and biases start again
    assert not adjust.active([2, 3])
    logits = torch.randn(1, V)
    assert torch.equal(adjust.apply(logits, torch.tensor([2])), logits)


def test_penalised_greedy_decoding_equals_a_naive_loop():
    """The engine's penalised greedy tokens are those of a full forward per step plus the
    per-row definition, and an unpenalised neighbour keeps generate's tokens."""
    model = make_model()
    prompt = torch.tensor(list(b"for i in range("))
    penal = SamplingParams(
        max_new_tokens=12, frequency_penalty=1.5, presence_penalty=0.7, logit_bias=((32, -3.0),)
    )
    plain = SamplingParams(max_new_tokens=12)

    async def main():
        engine = Engine(model, EngineConfig(max_batch=4, page_size=4))
        engine.start()
        seqs = [engine.submit(prompt, penal), engine.submit(prompt[:5], plain)]
        for seq in seqs:
            while (await seq.events.get()).kind != "done":
                pass
        await engine.stop()
        return [s.outputs for s in seqs]

    got, neighbour = asyncio.run(main())
    want: list[int] = []
    with torch.no_grad():
        for _ in range(12):
            x = torch.cat([prompt, torch.tensor(want, dtype=torch.long)])
            logits = model(x[None]).out[0, -1]
            want.append(int(_naive(logits, want, 1.5, 0.7, ((32, -3.0),)).argmax()))
    assert got == want
    alone = model.generate(prompt[None, :5], 12)[0, 5:].tolist()
    assert neighbour == alone
    assert want != model.generate(prompt[None], 12)[0, len(prompt) :].tolist()
