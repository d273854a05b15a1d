"""The app in-process: OpenAI n / logprobs / chat, request ids, cache control, CORS, metrics."""

from __future__ import annotations

import json

import openai
import pytest
import torch
from fastapi.testclient import TestClient

from moekit.model.codec import BYTE_CHAT_REPLY, ByteCodec
from moekit.serve.app import create_app
from moekit.serve.config import EngineConfig
from moekit.serve.security import SecurityConfig

from .conftest import make_model

KEY = "app-test-key-0123456789"


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def client(model):
    app = create_app(model, "tiny", EngineConfig(page_size=4, max_new_tokens=64))
    with TestClient(app) as c:
        yield c


def test_openai_client_n_logprobs_and_chat(client, model):
    oa = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client)
    prompt = "def f(x):"
    ids = list(prompt.encode())
    greedy = model.generate(torch.tensor([ids]), 6)[0, len(ids) :].tolist()
    r = oa.completions.create(
        model="tiny", prompt=prompt, max_tokens=6, temperature=0, n=2, logprobs=2
    )
    assert [c.index for c in r.choices] == [0, 1] and r.usage.completion_tokens == 12
    assert r.choices[0].text == r.choices[1].text == bytes(greedy).decode("utf-8", "replace")
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == 6 and all(len(t) == 2 for t in lp.top_logprobs)
    assert lp.tokens == [ByteCodec().token_text(t) for t in greedy]
    full = torch.tensor([ids + greedy])
    ref = model(full).out[0, len(ids) - 1 : -1].log_softmax(-1)
    assert abs(lp.token_logprobs[3] - ref[3, greedy[3]].item()) < 1e-4
    seeded = dict(model="tiny", prompt=prompt, max_tokens=8, temperature=1.0, seed=4, n=3)
    a = [c.text for c in oa.completions.create(**seeded).choices]
    b = [c.text for c in oa.completions.create(**seeded).choices]
    assert a == b and len(set(a)) > 1  # reproducible, and the choices differ
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    chat = oa.chat.completions.create(
        model="tiny", messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=1
    )
    text = "<|system|>\nbe brief\n<|user|>\nhi\n" + BYTE_CHAT_REPLY  # the byte-level template
    want = model.generate(torch.tensor([list(text.encode())]), 5)[0, len(text) :].tolist()
    assert chat.choices[0].message.content == bytes(want).decode("utf-8", "replace")
    assert chat.usage.prompt_tokens == len(text) and chat.choices[0].finish_reason == "length"
    content = chat.choices[0].logprobs.content
    assert [c.bytes for c in content] == [[t] for t in want] and len(content[0].top_logprobs) == 1
    stream = oa.chat.completions.create(
        model="tiny", messages=messages, max_tokens=5, temperature=0, stream=True
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces) == chat.choices[0].message.content


def test_request_ids_cache_control_and_errors(client):
    body = {"prompt": "# shared header for the cache test\nx", "max_new_tokens": 2}
    first = client.post("/v1/generate", json={**body, "request_id": "job:1"}).json()
    assert first["id"] == "job:1"
    hit = client.post("/v1/generate", json=body).json()
    skip = client.post("/v1/generate", json={**body, "use_cache": False}).json()
    assert hit["prefix_cache_tokens"] > 0 and skip["prefix_cache_tokens"] == 0
    assert skip["token_ids"] == hit["token_ids"] == first["token_ids"]
    bad = [
        ({**body, "request_id": "no spaces"}, "request_id"),
        ({**body, "logprobs": 99}, "logprobs"),
    ]
    for b, field in bad:
        r = client.post("/v1/generate", json=b)
        assert r.status_code == 422 and r.json()["error"]["field"] == field
    chat = {"model": "m", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}
    r = client.post("/v1/chat/completions", json=chat)
    assert r.status_code == 422 and r.json()["error"]["field"] == "top_logprobs"
    r = client.post("/v1/completions", json={"model": "m", "prompt": [1, 999], "max_tokens": 1})
    assert r.status_code == 422 and r.json()["error"]["field"] == "prompt"
    ids = client.post("/v1/completions", json={"model": "m", "prompt": [[1, 2], [3]], "n": 2})
    assert [c["index"] for c in ids.json()["choices"]] == [0, 1, 2, 3]
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"


def test_metrics_cover_latency_occupancy_kv_and_experts(client):
    r = client.post("/v1/generate", json={"prompt": "abc", "max_new_tokens": 5, "stream": True})
    assert r.status_code == 200
    text = client.get("/metrics").text
    for name in (
        "moekit_time_to_first_token_seconds_count",
        "moekit_inter_token_latency_seconds_count",
        "moekit_batch_occupancy ",
        "moekit_kv_usage ",
        'moekit_kv_pages_used{state="cached"}',
        'moekit_expert_tokens_total{expert="0",layer="0"}',
        "moekit_prefill_tokens_total",
    ):
        assert name in text, name
    itl = next(
        x for x in text.splitlines() if x.startswith("moekit_inter_token_latency_seconds_count")
    )
    assert float(itl.split()[-1]) >= 4  # 5 tokens: 4 gaps
    stats = client.get("/v1/stats").json()
    assert stats["kv"]["held"] == 0 and stats["inter_token_s"]["p50"] is not None
    info = client.get("/v1/model").json()
    assert info["engine"]["decode"]["mode"] == "eager" and info["dtype"] == "float32"


def test_cors_preflight_passes_the_key_check(model):
    app = create_app(
        model,
        security=SecurityConfig(api_keys=(KEY,)),
        cors_origins=["https://app.example.org"],
    )
    origin = {"Origin": "https://app.example.org"}
    with TestClient(app) as c:
        pre = c.options(
            "/v1/generate",
            headers={
                **origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type",
            },
        )
        assert pre.status_code == 200
        assert pre.headers["access-control-allow-origin"] == "https://app.example.org"
        body = {"prompt": "a", "max_new_tokens": 1}
        refused = c.post("/v1/generate", json=body, headers=origin)
        assert refused.status_code == 401  # CORS is not a way around the key
        assert refused.headers["access-control-allow-origin"] == "https://app.example.org"
        ok = c.post("/v1/generate", json=body, headers={**origin, "Authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200
        other = c.options(
            "/v1/generate",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert "access-control-allow-origin" not in other.headers


def test_a_tokenizer_brings_its_chat_template_and_eos(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    words = ["<unk>", "<eos>", "hello", "world", "user", "assistant", ":", "say"]
    tok = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>")
    )
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.decoder = tokenizers.decoders.WordPiece(prefix="##")  # joins words with spaces
    template = "{% for m in messages %}{{ m.role }} : {{ m.content }} {% endfor %}assistant :"
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>", chat_template=template
    )
    model = make_model(vocab_size=len(words))
    model.tokenizer = fast
    torch.manual_seed(0)
    with TestClient(create_app(model, engine=EngineConfig(page_size=4))) as c:
        info = c.get("/v1/model").json()
        assert info["tokenizer"] and not info["byte_level"]
        r = c.post(
            "/v1/chat/completions",
            json={
                "model": "m",
                "messages": [{"role": "user", "content": "say hello"}],
                "max_tokens": 20,
                "temperature": 0,
            },
        ).json()
        prompt = fast.apply_chat_template(
            [{"role": "user", "content": "say hello"}], tokenize=False, add_generation_prompt=True
        )
        ids = fast.encode(prompt, add_special_tokens=False)
        assert r["usage"]["prompt_tokens"] == len(ids)
        want = model.generate(torch.tensor([ids]), 20)[0, len(ids) :].tolist()
        if 1 in want:  # <eos> ends the reply and is not part of it
            want = want[: want.index(1)]
            assert r["choices"][0]["finish_reason"] == "stop"
        assert r["choices"][0]["message"]["content"] == fast.decode(want, skip_special_tokens=True)
        stream = c.post(
            "/v1/generate", json={"prompt": "hello world", "max_new_tokens": 4, "stream": True}
        )
        pieces = [
            json.loads(x[5:]).get("text")
            for x in stream.text.split("\n")
            if x.startswith("data:") and '"token_id"' in x
        ]
        done = json.loads(stream.text.strip().split("\n")[-1][5:])
        assert "".join(p or "" for p in pieces) == done["text"]
