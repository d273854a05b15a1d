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


def test_openai_clients_common_options_are_accepted(client, model):
    oa = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client)
    prompt = "def f(x):"
    ids = list(prompt.encode())
    greedy = bytes(model.generate(torch.tensor([ids]), 6)[0, len(ids) :].tolist())
    defaults = dict(frequency_penalty=0, presence_penalty=0, logit_bias={}, user="u", seed=1)
    r = oa.completions.create(
        model="tiny", prompt=prompt, max_tokens=6, temperature=0, best_of=1, suffix=None,
        echo=False, stream_options=None, extra_body={"top_k": 5}, **defaults,
    )  # fmt: skip
    assert r.choices[0].text == greedy.decode("utf-8", "replace")
    messages = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    chat = dict(model="tiny", messages=messages, max_completion_tokens=4, temperature=0)
    accepted = dict(
        tools=[], tool_choice="none", response_format={"type": "text"}, service_tier="auto",
        store=False, metadata={"k": "v"}, parallel_tool_calls=True, modalities=["text"],
        prompt_cache_key="p", safety_identifier="s", verbosity="medium",
    )  # fmt: skip
    want = oa.chat.completions.create(**chat).choices[0].message.content
    got = oa.chat.completions.create(**chat, **accepted, **defaults)
    assert got.choices[0].message.content == want  # defaults change nothing
    stream = oa.chat.completions.create(
        **chat, **defaults, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens == 4
    nulls = {"model": "m", "prompt": "a", "max_tokens": None, "temperature": None, "n": None}
    assert client.post("/v1/completions", json=nulls).status_code == 200  # null: the default


@pytest.mark.parametrize(
    "path, extra, field",
    [
        ("/v1/completions", {"best_of": 3}, "best_of"),
        ("/v1/completions", {"echo": True}, "echo"),
        ("/v1/completions", {"suffix": "end"}, "suffix"),
        ("/v1/chat/completions", {"tools": [{"type": "function", "function": {}}]}, "tools"),
        ("/v1/chat/completions", {"tool_choice": "required"}, "tool_choice"),
        ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
        ("/v1/chat/completions", {"store": True}, "store"),
        ("/v1/chat/completions", {"audio": {"voice": "x", "format": "wav"}}, "audio"),
        ("/v1/chat/completions", {"reasoning_effort": "high"}, "reasoning_effort"),
        ("/v1/chat/completions", {"service_tier": "flex"}, "service_tier"),
    ],
)
def test_an_unsupported_value_is_400_naming_the_field(client, path, extra, field):
    base = {"model": "m", "max_tokens": 2}
    user = [{"role": "user", "content": "a"}]
    base |= {"prompt": "a"} if path == "/v1/completions" else {"messages": user}
    r = client.post(path, json={**base, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["field"] == field and "not supported" in err["message"]


def test_unreadable_messages_and_malformed_fields(client):
    image = {"type": "image_url", "image_url": {"url": "http://x/y.png"}}
    tool = {"role": "tool", "content": "42", "tool_call_id": "c1"}
    for messages, field in [
        ([{"role": "user", "content": [image]}], "messages.0.content.0.type"),
        ([{"role": "user", "content": "a"}, tool], "messages.1.role"),
    ]:
        r = client.post("/v1/chat/completions", json={"model": "m", "messages": messages})
        assert r.status_code == 400 and r.json()["error"]["field"] == field
    history = [  # an earlier refusal, and an assistant turn without content, are read past
        {"role": "user", "content": "a", "name": "me"},
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]},
        {"role": "assistant", "content": None, "tool_calls": []},
    ]
    r = client.post(
        "/v1/chat/completions", json={"model": "m", "messages": history, "max_tokens": 1}
    )
    assert r.status_code == 200, r.text
    for extra, field in [
        ({"frequency_penalty": 3}, "frequency_penalty"),
        ({"logit_bias": {"1": 101}}, "logit_bias"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"²": 1}}, "logit_bias"),
        ({"logit_bias": {"256": 1}}, "logit_bias"),
        ({"best_of": "two"}, "best_of"),
        ({"no_such_field": 1}, "no_such_field"),
    ]:
        r = client.post("/v1/completions", json={"model": "m", "prompt": "a", **extra})
        assert r.status_code == 422 and r.json()["error"]["field"] == field, (extra, r.text)


def test_logit_bias_and_penalties_reach_the_sampler(client):
    body = {"model": "m", "prompt": "def f(x):", "max_tokens": 8, "temperature": 0}
    forced = client.post("/v1/completions", json={**body, "logit_bias": {"65": 100}}).json()
    assert forced["choices"][0]["text"] == "A" * 8
    plain = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    first = ord(plain[0])  # banned: the greedy reply starts otherwise
    banned = client.post("/v1/completions", json={**body, "logit_bias": {str(first): -100}})
    assert banned.json()["choices"][0]["text"][0] != plain[0]
    penalised = {**body, "presence_penalty": 2.0, "frequency_penalty": 2.0, "max_tokens": 16}
    text = client.post("/v1/completions", json=penalised).json()["choices"][0]["text"]
    assert (
        text
        != client.post("/v1/completions", json={**body, "max_tokens": 16}).json()["choices"][0][
            "text"
        ]
    )


def test_prompts_past_the_context_are_refused_with_both_lengths(client):
    long = "x" * 70  # the model's context: 64 positions
    chat = {"model": "m", "messages": [{"role": "user", "content": long}]}
    for path, body, field, n in [
        ("/v1/generate", {"prompt": long}, "prompt", 70),
        ("/v1/route", {"token_ids": [1] * 70}, "token_ids", 70),
        ("/v1/completions", {"model": "m", "prompt": long}, "prompt", 70),
        ("/v1/chat/completions", chat, "messages", 70 + len("<|user|>\n\n" + BYTE_CHAT_REPLY)),
    ]:
        r = client.post(path, json=body)
        err = r.json()["error"]
        assert r.status_code == 400 and err["field"] == field, (path, r.text)
        assert "maximum context length is 64 tokens" in err["message"]
        assert f"the prompt has {n} tokens" in err["message"]
    over = {"model": "m", "prompt": "x" * 60, "max_tokens": 10}  # 60 + 10 > 64: refused
    err = client.post("/v1/completions", json=over).json()["error"]
    assert err["field"] == "max_tokens" and "70 tokens (60 in the prompt, 10 for" in err["message"]
    chat = {"model": "m", "messages": [{"role": "user", "content": "x" * 30}], "temperature": 0}
    r = client.post("/v1/chat/completions", json=chat).json()  # no max_tokens: what is left
    assert r["usage"]["total_tokens"] == 64 and r["choices"][0]["finish_reason"] == "length"
    native = client.post("/v1/generate", json={"prompt": "x" * 60, "max_new_tokens": 10})
    assert native.status_code == 200  # the native endpoint slides its window, as generate does


def test_served_model_name_and_a_smaller_context(model):
    app = create_app(
        model,
        "ckpt-dir",
        EngineConfig(page_size=4, max_model_len=32, max_new_tokens=8),
        served_model_name="alias",
    )
    with TestClient(app) as c:
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["alias"]
        assert c.get("/health").json()["model"] == "alias"
        r = c.post("/v1/completions", json={"model": "other", "prompt": "a", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["model"] == "alias"
        info = c.get("/v1/model").json()
        assert info["context_length"] == 32 and info["engine"]["max_model_len"] == 32
        kv = info["engine"]["kv"]  # pages for 32 positions a row, not the model's 64
        full = create_app(model, engine=EngineConfig(page_size=4, max_new_tokens=8))
        with TestClient(full) as f:
            assert f.get("/v1/model").json()["engine"]["kv"]["bytes"] > kv["bytes"]
        r = c.post("/v1/generate", json={"prompt": "x" * 40})
        assert r.status_code == 400 and "maximum context length is 32" in r.text
