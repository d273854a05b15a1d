"""The one request pipeline: `Service.submit` -> a handle that streams or collects its choices."""

from __future__ import annotations

import asyncio

import pytest
import torch
from fastapi.testclient import TestClient

import moekit
from moekit.model import ModelConfig, Transformer
from moekit.model.codec import ByteCodec
from moekit.serve.app import create_app
from moekit.serve.config import EngineConfig
from moekit.serve.engine import Engine
from moekit.serve.inputs import ApiError
from moekit.serve.sequence import SamplingParams
from moekit.serve.service import MAX_STOPS, Service

from .conftest import make_model

PROMPT = "def f(x):"
CFG = EngineConfig(page_size=4, max_new_tokens=64)


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def greedy(model) -> list[int]:
    """The model's own greedy continuation of PROMPT: what every pipeline must produce."""
    ids = list(PROMPT.encode())
    return model.generate(torch.tensor([ids]), 12)[0, len(ids) :].tolist()


def serve(model, use, codec=None, cfg: EngineConfig = CFG):
    """Run `use(service)` against a started engine over `model`; its result."""

    async def main():
        engine = Engine(model, cfg)
        engine.start()
        try:
            return await use(Service(engine, codec or ByteCodec()))
        finally:
            await engine.stop()

    return asyncio.run(main())


def prompt() -> torch.Tensor:
    return torch.tensor(list(PROMPT.encode()))


async def deltas_of(handle) -> list:
    return [d async for d in handle.stream()]


def test_result_equals_what_the_endpoints_answer(model, greedy):
    params = SamplingParams(max_new_tokens=12)

    async def use(service):
        handle = service.submit([prompt()], params, n=2)
        return await handle.result(), handle.usage()

    choices, usage = serve(model, use)
    app = create_app(model, "tiny", CFG)
    with TestClient(app) as client:
        body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "n": 2}
        completion = client.post("/v1/completions", json=body).json()
        generated = client.post("/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 12})
    assert [c.seq.outputs for c in choices] == [greedy, greedy]
    assert [c.text for c in choices] == [x["text"] for x in completion["choices"]]
    assert [c.reason() for c in choices] == [x["finish_reason"] for x in completion["choices"]]
    assert usage.model_dump() == completion["usage"]
    assert generated.json()["text"] == choices[0].text
    assert generated.json()["token_ids"] == choices[0].seq.outputs


def test_stream_yields_the_same_text_and_one_end_per_choice(model, greedy):
    params = SamplingParams(max_new_tokens=12, logprobs=1)

    async def use(service):
        streamed = service.submit([prompt(), prompt()[:4]], params, n=2)
        deltas = await deltas_of(streamed)
        collected = await service.submit([prompt(), prompt()[:4]], params, n=2).result()
        return deltas, streamed.choices, collected

    deltas, choices, collected = serve(model, use)
    assert [c.text for c in choices] == [c.text for c in collected]
    for i, choice in enumerate(choices):
        mine = [d for d in deltas if d.index == i]
        assert "".join(d.text for d in mine) == choice.text
        assert [d.finish_reason for d in mine][-1] == "length"
        assert all(d.finish_reason is None for d in mine[:-1])  # exactly one end
        assert [d.token for d in mine[:-1]] == choice.seq.outputs
        assert [d.logprobs for d in mine[:-1]] == [lp for _, lp in choice.logprobs]
    assert choices[0].seq.outputs == greedy  # choice j * n + i continues prompt j


def test_a_stop_string_ends_the_text_once_and_cancels(model, greedy):
    text = bytes(greedy).decode("utf-8", "replace")
    stop = text[3:5]  # occurs in the greedy text: the choice ends just before it
    params = SamplingParams(max_new_tokens=12)

    async def use(service):
        deltas = await deltas_of(service.submit([prompt()], params, stops=stop))
        (choice,) = await service.submit([prompt()], params, stops=[stop, stop]).result()
        return deltas, choice

    deltas, choice = serve(model, use)
    assert choice.text == text[: text.index(stop)] and choice.reason() == "stop"
    assert choice.seq.finish_reason == "cancelled"  # its sequence stopped early
    assert "".join(d.text for d in deltas) == choice.text
    assert [d.finish_reason for d in deltas].count("stop") == 1
    assert deltas[-1].finish_reason == "stop"


def test_a_stop_id_ends_the_sequence_and_is_kept_once(model, greedy):
    stop_id = greedy[4]
    codec = ByteCodec()
    codec.eos_ids = (stop_id,)  # the tokenizer's end-of-sequence: every request stops on it

    async def use(service):
        plain = service.submit([prompt()], SamplingParams(max_new_tokens=12))
        asked = service.submit([prompt()], SamplingParams(12, stop_token_ids=(7, stop_id)))
        return await plain.result(), await asked.result()

    (plain,), (asked,) = serve(model, use, codec)
    first = greedy.index(stop_id)
    assert plain.seq.outputs == greedy[:first] and plain.reason() == "stop"
    assert plain.text == bytes(greedy[:first]).decode("utf-8", "replace")
    assert plain.seq.params.stop_token_ids == (stop_id,)
    assert asked.seq.params.stop_token_ids == (7, stop_id)  # merged, not repeated


def test_refusals_queue_nothing(model):
    async def use(service):
        with pytest.raises(ApiError) as many:
            service.submit([prompt()], SamplingParams(), stops=["a"] * (MAX_STOPS + 1))
        with pytest.raises(ApiError) as full:
            service.submit([prompt(), prompt()], SamplingParams(), n=2)  # 4 > max_queue 3
        queued = list(service.engine.waiting)  # the first prompt's two, cancelled at once
        for _ in range(100):
            if service.engine.queue_depth == 0:
                break
            await asyncio.sleep(0.01)
        return many.value, full.value, queued

    cfg = EngineConfig(page_size=4, max_queue=3)
    many, full, queued = serve(model, use, cfg=cfg)
    assert (many.status, many.field) == (422, "stop")
    assert full.status == 429 and full.headers == {"Retry-After": "1"}
    assert len(queued) == 2 and all(seq.cancelled for seq in queued)
    assert all(seq.finish_reason == "cancelled" for seq in queued)  # retired, never run


@pytest.mark.parametrize("n", [1, 2])  # one sequence is read in place, several merged
def test_a_client_that_leaves_cancels_every_choice(model, n):
    async def gone() -> bool:
        return True

    async def main():
        engine = Engine(model, CFG)  # not started: nothing is generated before the client goes
        handle = Service(engine, ByteCodec()).submit(
            [prompt()], SamplingParams(), n, disconnected=gone
        )
        return await deltas_of(handle), handle

    deltas, handle = asyncio.run(main())
    assert [(d.index, d.finish_reason) for d in deltas] == [(i, "cancelled") for i in range(n)]
    assert all(seq.cancelled for seq in handle.seqs)


def test_a_continuous_model_streams_vectors_without_text():
    torch.manual_seed(0)
    moe = moekit.MoEConfig(d_model=32, d_hidden=32, n_experts=4, k=2)
    cfg = ModelConfig(d_in=3, d_out=3, d_model=32, n_layers=2, n_heads=2, max_seq_len=16, moe=moe)
    model = Transformer(cfg).eval()
    x = torch.tensor([[0.1, 0.2, 0.3]])  # [P=1, d_in]

    async def main():
        engine = Engine(model, CFG)
        engine.start()
        handle = Service(engine, None).submit([x], SamplingParams(max_new_tokens=3), stops="x")
        deltas = await deltas_of(handle)
        await engine.stop()
        return deltas, handle.choices[0]

    deltas, choice = asyncio.run(main())
    assert [d.text for d in deltas] == [None] * 4 and choice.text is None
    assert [d.token for d in deltas[:3]] == choice.seq.outputs and deltas[3].token is None
    assert choice.seq.outputs[0].shape == (3,) and deltas[3].finish_reason == "length"
