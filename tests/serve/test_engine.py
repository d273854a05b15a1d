"""Engine without HTTP: batching, chunked prefill and prefix reuse give one-at-a-time outputs."""

from __future__ import annotations

import asyncio

import pytest
import torch

import moekit
from moekit.model import ModelConfig, Transformer
from moekit.serve.config import EngineConfig
from moekit.serve.engine import Engine, QueueFull
from moekit.serve.sequence import SamplingParams, Sequence

from .conftest import make_model


async def _drain(seq: Sequence) -> None:
    while (await seq.events.get()).kind != "done":
        pass


def _run(model: Transformer, prompts, params, **cfg) -> tuple[list[Sequence], Engine]:
    """Submit every prompt at once and wait for all of them."""

    async def main():
        engine = Engine(model, EngineConfig(**cfg))
        engine.start()
        seqs = [engine.submit(p, params) for p in prompts]
        await asyncio.gather(*(_drain(s) for s in seqs))
        await engine.stop()
        return seqs, engine

    return asyncio.run(main())


def test_concurrent_greedy_equals_generate_alone():
    """Different lengths, more requests than rows, chunked prompts, prompts past the window."""
    model = make_model()
    torch.manual_seed(1)
    prompts = [torch.randint(0, 256, (n,)) for n in (1, 5, 12, 30, 64, 80, 7)]
    params = SamplingParams(max_new_tokens=40)
    seqs, engine = _run(model, prompts, params, max_batch=4, page_size=4, prefill_chunk=16)
    for p, seq in zip(prompts, seqs, strict=True):
        alone = model.generate(p[None], 40)[0, len(p) :].tolist()
        assert seq.outputs == alone
        assert seq.finish_reason == "length"
    assert engine.stats.batched_sequences / engine.stats.steps > 2  # it did batch
    assert engine.active == 0 and engine.runner.free_rows == 4
    usage = engine.runner.kv.usage()
    assert usage["held"] == 0 and usage["reserved"] == 0  # every page came back


def test_expert_counts_add_up_on_the_device():
    """Every prefilled and decoded position routes k token-slots in each MoE layer."""
    model = make_model()
    prompts = [torch.randint(0, 256, (n,)) for n in (3, 9, 20)]
    _, engine = _run(model, prompts, SamplingParams(max_new_tokens=6), prefix_cache_tokens=0)
    counts = engine.stats.expert_tokens  # [L, E]
    assert counts is engine.runner.expert_tokens and counts.device == engine.runner.kv.device
    positions = sum(len(p) + 6 - 1 for p in prompts)  # the last output is never fed
    assert counts.sum(1).tolist() == [2 * positions] * 2
    load = engine.stats.expert_load()
    assert [row["tokens"] for row in load] == counts.tolist()


def test_greedy_rows_ignore_sampled_neighbours():
    model = make_model()
    p = torch.tensor(list(b"while True:"))
    greedy = SamplingParams(max_new_tokens=12)
    hot = SamplingParams(max_new_tokens=12, temperature=1.5, top_k=40, seed=1)

    async def main():
        engine = Engine(model, EngineConfig(max_batch=4))
        engine.start()
        seqs = [engine.submit(p, hot), engine.submit(p, greedy), engine.submit(p[:3], hot)]
        await asyncio.gather(*(_drain(s) for s in seqs))
        await engine.stop()
        return seqs

    hot_a, cold, hot_b = asyncio.run(main())
    assert cold.outputs == model.generate(p[None], 12)[0, len(p) :].tolist()
    assert hot_a.outputs != cold.outputs and len(hot_b.outputs) == 12


def test_seeded_sampling_does_not_depend_on_batch():
    model = make_model()
    params = SamplingParams(max_new_tokens=20, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    p = torch.tensor(list(b"def main():"))
    (alone,), _ = _run(model, [p], params)
    crowd, _ = _run(model, [torch.tensor(list(b"x = 1")), p, p[:4]], params)
    assert crowd[1].outputs == alone.outputs
    other = SamplingParams(max_new_tokens=20, temperature=1.0, seed=8)
    (diff,), _ = _run(model, [p], other)
    assert diff.outputs != alone.outputs


def test_prefix_cache_hit_gives_the_same_output():
    model = make_model()
    shared = torch.tensor(list(b"import torch\nimport numpy as np\n"))  # 32 bytes
    prompts = [torch.cat([shared, torch.tensor(list(s))]) for s in (b"x", b"def f(a):", b"y =")]
    prompts.append(prompts[1])  # a repeat: every full block but the one holding its last byte
    prompts.append(prompts[0])  # 32 of 33 positions cached: the last one is fed by a decode step

    async def main(cache_tokens: int, use_cache: bool = True):
        engine = Engine(model, EngineConfig(prefix_cache_tokens=cache_tokens, page_size=4))
        engine.start()
        out = []
        for p in prompts:  # one after another, so later ones can hit
            seq = engine.submit(p, SamplingParams(max_new_tokens=15), use_cache=use_cache)
            await _drain(seq)
            out.append(seq)
        await engine.stop()
        return out, engine

    hit, engine = asyncio.run(main(4096))
    miss, _ = asyncio.run(main(0))
    unused, unused_engine = asyncio.run(main(4096, use_cache=False))
    assert [s.prefix_hit for s in hit] == [0, 32, 32, 40, 32]  # whole pages of 4
    assert [s.prefix_hit for s in miss] == [0, 0, 0, 0, 0]
    assert [s.prefix_hit for s in unused] == [0, 0, 0, 0, 0]
    assert [s.outputs for s in hit] == [s.outputs for s in miss] == [s.outputs for s in unused]
    stats = engine.runner.kv.pool.stats
    assert stats.hits == 4 and stats.tokens_reused == 136
    fed = sum(len(p) for p in prompts) - 136
    assert engine.stats.prefill_tokens == fed - 2  # the repeats' last positions went to decode
    assert unused_engine.runner.kv.pool.stats.lookups == 0


def test_continuous_rollout_equals_generate():
    torch.manual_seed(0)
    moe = moekit.MoEConfig(d_model=32, d_hidden=32, n_experts=4, k=2)
    cfg = ModelConfig(d_in=3, d_out=3, d_model=32, n_layers=2, n_heads=2, max_seq_len=16, moe=moe)
    model = Transformer(cfg).eval()
    prompts = [torch.randn(n, 3) for n in (2, 9, 20)]
    seqs, engine = _run(model, prompts, SamplingParams(max_new_tokens=12), page_size=4)
    for p, seq in zip(prompts, seqs, strict=True):
        ref = model.generate(p[None], 12)[0, len(p) :]
        torch.testing.assert_close(torch.stack(seq.outputs), ref, atol=1e-4, rtol=1e-4)
    signal = torch.cat([prompts[1], torch.randn(3, 3)])  # the same 9 leading vectors
    nudged = signal.clone()
    nudged[0, 0] += 1e-3

    async def one_by_one():
        engine = Engine(model, EngineConfig(page_size=4))
        engine.start()
        out = []
        for p in (prompts[1], signal, nudged):
            out.append(engine.submit(p, SamplingParams(max_new_tokens=3)))
            await _drain(out[-1])
        await engine.stop()
        return out

    first, hit, miss = asyncio.run(one_by_one())
    assert (first.prefix_hit, hit.prefix_hit, miss.prefix_hit) == (0, 8, 0)  # bitwise equal only
    ref = model.generate(signal[None], 3)[0, len(signal) :]
    torch.testing.assert_close(torch.stack(hit.outputs), ref, atol=1e-4, rtol=1e-4)


def test_capacity_limited_model_decodes_one_at_a_time():
    moe = moekit.MoEConfig(d_model=64, d_hidden=64, n_experts=4, k=2, capacity_factor=1.0)
    model = make_model(moe=moe)
    engine = Engine(model, EngineConfig(max_batch=8))
    assert not engine.batch_invariant
    assert engine.runner.kv.n_rows == 1 and not engine.prefix_cache
    assert engine.runner.chunk is None  # prompts are fed whole: routing sees all of them


def test_queue_bound_cancel_and_timeout():
    model = make_model()

    async def main():
        engine = Engine(model, EngineConfig(max_batch=1, max_queue=2, request_timeout_s=0.5))
        p = torch.tensor([1, 2, 3])
        long = SamplingParams(max_new_tokens=100000)
        a, b = engine.submit(p, long), engine.submit(p, long)
        with pytest.raises(QueueFull):
            engine.submit(p, long)
        assert engine.stats.rejected == 1
        engine.start()
        engine.cancel(b)  # still waiting: never runs
        await asyncio.gather(_drain(a), _drain(b))
        await engine.stop()
        return a, b, engine

    a, b, engine = asyncio.run(main())
    assert b.finish_reason == "cancelled" and b.outputs == []
    assert a.finish_reason == "timeout" and 0 < len(a.outputs) < 100000
    assert engine.active == 0 and engine.stats.finished == {"cancelled": 1, "timeout": 1}
