"""Runner and engine scheduling: batched and chunked prefill, n choices, stops, logprobs, memory."""

from __future__ import annotations

import asyncio

import pytest
import torch

from moekit.serve.config import EngineConfig
from moekit.serve.engine import Engine
from moekit.serve.paged import page_bytes
from moekit.serve.runner import ModelRunner, prefill_groups
from moekit.serve.sequence import SamplingParams, Sequence

from .conftest import make_model


async def _drain(seq: Sequence) -> None:
    while (await seq.events.get()).kind != "done":
        pass


def _run_one(model, prompt, params: SamplingParams) -> Sequence:
    """One request through a started engine, to its end."""

    async def main():
        engine = Engine(model, EngineConfig())
        engine.start()
        seq = engine.submit(prompt, params)
        await _drain(seq)
        await engine.stop()
        return seq

    return asyncio.run(main())


def _seq(prompt, max_new=8, **params) -> Sequence:
    return Sequence("s", prompt, SamplingParams(max_new_tokens=max_new, **params), 1e18)


def test_prefill_groups_pad_little():
    seqs = [_seq(torch.zeros(1, dtype=torch.long)) for _ in range(4)]
    work = list(zip(seqs, [10, 9, 2, 10], strict=True))
    groups = prefill_groups(work)
    assert [[n for _, n in g] for g in groups] == [[10, 10, 9], [2]]


def test_admitted_prompts_share_a_forward_and_long_ones_never_stall_decodes():
    model = make_model(max_seq_len=128)
    runner = ModelRunner(model, EngineConfig(max_batch=4, page_size=4, prefill_chunk=8))
    calls: list[tuple[int, int]] = []  # (rows, positions) of each prefill forward
    forward = runner._forward

    def counted(rows, counts, x):
        calls.append((len(rows), sum(counts)))
        return forward(rows, counts, x)

    runner._forward = counted
    got: dict[int, list[int]] = {}

    def step():
        out = runner.step()
        for seq, value, _ in out.outputs:
            got.setdefault(id(seq), []).append(value)
        return out

    a, b = _seq(torch.arange(3) + 40, 12), _seq(torch.arange(4) + 50, 12)
    assert runner.try_admit(a) and runner.try_admit(b)
    out = step()
    assert calls == [(2, 7)]  # both prompts in one padded forward
    assert {s for s, _, _ in out.outputs} == {a, b} and out.prefilled == 7
    long = _seq(torch.randint(0, 256, (40,)), 4)
    assert runner.try_admit(long)
    steps = 0
    while long not in runner.decoding:
        out = step()
        steps += 1
        assert out.decoded == 2  # the running ones advance at every step
    assert steps == 5 and calls[1:] == [(1, 8)] * 5  # 40 positions, 8 a step
    for _ in range(3):
        step()
    for seq in (a, b, long):  # the tokens each gets alone
        n = len(got[id(seq)])
        assert got[id(seq)] == model.generate(seq.prompt[None], n)[0, len(seq.prompt) :].tolist()


def test_n_choices_wait_for_the_first_and_reuse_its_prompt():
    model = make_model()
    prompt = torch.tensor(list(b"the quick brown fox jumps over"))
    hot = SamplingParams(max_new_tokens=10, temperature=1.0, top_k=50, seed=11)

    async def main():
        engine = Engine(model, EngineConfig(page_size=4))
        engine.start()
        group = engine.submit_n(prompt, hot, 3, request_id="req-7")
        await asyncio.gather(*(_drain(s) for s in group))
        alone = [engine.submit(prompt, SamplingParams(**{**hot.__dict__, "seed": 12}))]
        await _drain(alone[0])
        await engine.stop()
        return group, alone[0]

    group, alone = asyncio.run(main())
    assert [s.id for s in group] == ["req-7-0", "req-7-1", "req-7-2"]
    assert [s.seed for s in group] == [11, 12, 13]
    assert [s.prefix_hit for s in group] == [0, 28, 28]  # followers start from the first's pages
    assert group[1].outputs == alone.outputs  # choice i samples as seed + i alone would
    assert len({tuple(s.outputs) for s in group}) == 3


def test_stop_tokens_end_a_sequence_without_emitting_them():
    model = make_model()
    prompt = torch.tensor(list(b"while True:"))
    want = model.generate(prompt[None], 12)[0, len(prompt) :].tolist()
    stop = want[5]
    params = SamplingParams(max_new_tokens=12, stop_token_ids=(stop,))

    seq = _run_one(model, prompt, params)
    assert seq.finish_reason == "stop" and seq.outputs == want[: want.index(stop)]


def test_logprobs_are_the_models_own():
    model = make_model()
    prompt = torch.tensor(list(b"import os"))
    params = SamplingParams(max_new_tokens=6, temperature=0.7, seed=3, logprobs=3)

    seq = _run_one(model, prompt, params)
    full = torch.cat([prompt, torch.tensor(seq.outputs)])
    lp = model(full[None]).out[0, len(prompt) - 1 : -1].log_softmax(-1)  # [6, V]
    for i, (token, got) in enumerate(zip(seq.outputs, seq.logprobs_out, strict=True)):
        assert abs(got.logprob - lp[i, token].item()) < 1e-4
        best = lp[i].topk(3)
        assert [t for t, _ in got.top] == best.indices.tolist()
        assert all(
            abs(v - w) < 1e-4 for (_, v), w in zip(got.top, best.values.tolist(), strict=True)
        )


def test_requests_wait_for_pages_and_still_get_their_tokens():
    model = make_model()
    one_row = 17 * page_bytes(model, 4)  # 16 pages of 4 hold max_seq_len 64; and scratch
    cfg = dict(page_size=4, kv_memory=str(one_row), prefix_cache_tokens=0, max_batch=8)
    prompts = [torch.randint(0, 256, (n,)) for n in (30, 9, 20)]  # reserve 10, 5, 8 pages

    async def main():
        engine = Engine(model, EngineConfig(**cfg))
        assert engine.runner.kv.pool.n_pages == 17
        engine.start()
        seqs = [engine.submit(p, SamplingParams(max_new_tokens=10)) for p in prompts]
        peak = 0
        while not all(s.done for s in seqs):
            peak = max(peak, engine.active)
            await asyncio.sleep(0.001)
        await engine.stop()
        return seqs, peak

    seqs, peak = asyncio.run(main())
    assert peak == 2  # 10 + 5 of 16 pages: the third waits; memory, not max_batch, bounds it
    for p, seq in zip(prompts, seqs, strict=True):
        assert seq.outputs == model.generate(p[None], 10)[0, len(p) :].tolist()


def test_a_failed_step_frees_every_page_and_the_engine_goes_on():
    model = make_model()

    async def main():
        engine = Engine(model, EngineConfig(page_size=4))
        step = engine.runner.step
        engine.runner.step = lambda: (_ for _ in ()).throw(RuntimeError("boom"))
        engine.start()
        failed = engine.submit(torch.arange(10), SamplingParams(max_new_tokens=4))
        await _drain(failed)
        engine.runner.step = step
        ok = engine.submit(torch.arange(10), SamplingParams(max_new_tokens=4))
        await _drain(ok)
        await engine.stop()
        return failed, ok, engine

    failed, ok, engine = asyncio.run(main())
    assert failed.finish_reason == "error" and ok.finish_reason == "length"
    assert engine.runner.kv.usage()["held"] == 0 and engine.stats.finished["error"] == 1


def test_max_model_len_sizes_the_kv_not_the_configs_maximum():
    """A config claiming 131072 positions on a tiny model: rows sized by max_model_len."""
    model = make_model(max_seq_len=131072)
    runner = ModelRunner(model, EngineConfig(page_size=16, max_batch=4, max_model_len=64), True)
    assert runner.window == 64 and runner.kv.row_pages == 4
    useful = 4 * 4 + EngineConfig().prefix_cache_tokens // 16 + 1  # rows + prefix + scratch
    assert runner.kv.pool.n_pages == useful
    assert runner.kv.usage()["bytes"] == useful * page_bytes(model, 16)
    big = EngineConfig(page_size=16, max_batch=4, max_model_len=10**6)  # never past the model
    assert big.context_length(model.cfg.max_seq_len) == 131072
    for bad in (0, True, 1.5):
        with pytest.raises(ValueError, match="max_model_len"):
            EngineConfig(max_model_len=bad)  # type: ignore[arg-type]
    prompt = torch.randint(0, 256, (50,))

    async def main():
        engine = Engine(model, EngineConfig(page_size=16, max_batch=4, max_model_len=64))
        engine.start()
        seq = engine.submit(prompt, SamplingParams(max_new_tokens=30))  # slides past 64
        await _drain(seq)
        await engine.stop()
        return seq.outputs

    assert len(asyncio.run(main())) == 30
