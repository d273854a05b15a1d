"""The server as a real process: every endpoint, errors, streaming, cancellation, drain."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest
import torch

import moekit

from .conftest import ServerProcess


def _sse(lines) -> list[tuple[str | None, str]]:
    """(event, data) pairs from an SSE line iterator."""
    out, event = [], None
    for line in lines:
        if line.startswith("event:"):
            event = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            out.append((event, line.split(":", 1)[1].strip()))
            event = None
    return out


def test_health_model_and_docs(client, byte_ckpt):
    assert client.get("/health").json()["status"] == "ok"
    info = client.get("/v1/model").json()
    model = moekit.load(byte_ckpt)
    assert info["params"] == model.num_params()
    assert info["params"]["active"] < info["params"]["total"]
    assert [layer["n_experts"] for layer in info["moe_layers"]] == [4, 4]
    assert info["config"]["vocab_size"] == 256 and info["engine"]["batch_invariant"]
    assert client.get("/docs").status_code == 200
    assert "/v1/completions" in client.get("/openapi.json").json()["paths"]


def test_generate_json_and_stream_agree_with_the_model(client, byte_ckpt):
    model = moekit.load(byte_ckpt)
    prompt = "def add(a, b):"
    ids = list(prompt.encode())
    want = model.generate(torch.tensor([ids]), 24)[0, len(ids) :].tolist()
    r = client.post("/v1/generate", json={"prompt": prompt, "max_new_tokens": 24})
    body = r.json()
    assert r.status_code == 200 and body["token_ids"] == want
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 24, "total_tokens": 38}
    assert body["text"] == bytes(want).decode("utf-8", errors="replace")
    req = {"token_ids": ids, "max_new_tokens": 24, "stream": True}
    with client.stream("POST", "/v1/generate", json=req) as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        events = _sse(s.iter_lines())
    tokens = [json.loads(d) for e, d in events if e is None]
    assert [t["token_id"] for t in tokens] == want and [t["index"] for t in tokens] == list(
        range(24)
    )
    assert events[-1][0] == "done" and json.loads(events[-1][1])["token_ids"] == want


def test_route_matches_a_direct_forward(client, byte_ckpt):
    model = moekit.load(byte_ckpt)
    r = client.post("/v1/route", json={"prompt": "abc d"}).json()
    out = model(torch.tensor([list(b"abc d")]))
    assert r["positions"] == 5 and r["tokens"] == list("abc d")
    assert [layer["layer"] for layer in r["layers"]] == [0, 1]
    for layer, info in zip(r["layers"], out.layers, strict=True):
        assert layer["experts"] == info.routing.experts.tolist()
        torch.testing.assert_close(torch.tensor(layer["weights"]), info.routing.weights)


def test_stats_and_metrics_count_requests(client):
    before = client.get("/v1/stats").json()
    client.post("/v1/generate", json={"prompt": "hello", "max_new_tokens": 5})
    stats = client.get("/v1/stats").json()
    assert stats["tokens"]["generated"] - before["tokens"]["generated"] == 5
    assert (
        stats["requests"]["finished"]["length"]
        == before["requests"]["finished"].get("length", 0) + 1
    )
    load = stats["expert_load"]
    assert len(load) == 2 and all(sum(layer["tokens"]) > 0 for layer in load)
    text = client.get("/metrics").text
    assert "moekit_generated_tokens_total" in text
    line = next(x for x in text.splitlines() if x.startswith("moekit_generated_tokens_total"))
    assert float(line.split()[-1]) == stats["tokens"]["generated"]
    assert 'moekit_expert_tokens_total{expert="0",layer="0"}' in text


def test_prefix_cache_over_http(client):
    shared = "# a long shared header line for the cache test\n"
    a = client.post("/v1/generate", json={"prompt": shared + "x", "max_new_tokens": 4}).json()
    b = client.post("/v1/generate", json={"prompt": shared + "y", "max_new_tokens": 4}).json()
    page = client.get("/v1/model").json()["engine"]["page_size"]
    assert a["prefix_cache_tokens"] == 0  # whole pages of the shared prefix are reused
    assert b["prefix_cache_tokens"] == len(shared) // page * page > 0


BAD = [
    ('{"prompt": "a",', "body"),  # malformed JSON
    ({"prompt": 5}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "a", "max_new_tokens": "3"}, "max_new_tokens"),
    ({"prompt": "a", "max_new_tokens": 100000}, "max_new_tokens"),
    ({"prompt": "a", "max_new_tokens": 0}, "max_new_tokens"),
    ({"prompt": "a", "temperature": -1}, "temperature"),
    ({"prompt": "a", "top_p": 1.5}, "top_p"),
    ({"prompt": "a", "color": "red"}, "color"),
    ({"token_ids": [1, 300]}, "token_ids"),
    ({"token_ids": [1, -1]}, "token_ids"),
    ({"prompt": "a", "token_ids": [1]}, "token_ids"),
    ({"inputs": [[1.0, 2.0]]}, "inputs"),
    ({}, "prompt"),
]


@pytest.mark.parametrize(("body", "field"), BAD)
def test_bad_input_is_a_4xx_naming_the_field(client, body, field):
    if isinstance(body, str):
        r = client.post("/v1/generate", content=body, headers={"content-type": "application/json"})
    else:
        r = client.post("/v1/generate", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"].split(".")[0] == field


def test_nan_in_vectors_refused_by_a_continuous_model(tmp_path):
    torch.manual_seed(0)
    moe = moekit.MoEConfig(d_model=32, d_hidden=32, n_experts=4, k=2)
    cfg = moekit.model.ModelConfig(
        d_in=3, d_out=3, d_model=32, n_layers=2, n_heads=2, max_seq_len=16, moe=moe
    )
    moekit.model.save_model_files(moekit.model.Transformer(cfg), tmp_path)
    srv = ServerProcess(tmp_path)
    try:
        ok = httpx.post(
            srv.url + "/v1/generate", json={"inputs": [[0.1, 0.2, 0.3]], "max_new_tokens": 3}
        )
        assert ok.status_code == 200 and len(ok.json()["outputs"]) == 3
        assert len(ok.json()["outputs"][0]) == 3
        head = {"content-type": "application/json"}
        for raw, field in [
            ('{"inputs": [[NaN, 1, 2]]}', "inputs"),
            ('{"inputs": [[Infinity, 1, 2]]}', "inputs"),
            ('{"inputs": [[1, 2]]}', "inputs"),
            ('{"inputs": []}', "inputs"),
            ('{"inputs": [[1e300, 1, 2]]}', "inputs"),
            ('{"prompt": "abc"}', "prompt"),
        ]:
            r = httpx.post(srv.url + "/v1/generate", content=raw, headers=head)
            assert r.status_code == 422 and r.json()["error"]["field"].startswith(field), raw
        route = httpx.post(srv.url + "/v1/route", json={"inputs": [[0.0, 1.0, 2.0]] * 4}).json()
        assert len(route["layers"][0]["experts"]) == 4
    finally:
        srv.stop()


def test_queue_full_is_429_with_retry_after(byte_ckpt):
    opts = ("--max-batch", "1", "--max-queue", "1", "--max-new-tokens", "5000")
    srv = ServerProcess(byte_ckpt, *opts, "--request-timeout-s", "4")
    body = {"prompt": "a", "max_new_tokens": 3000}
    done: list[str] = []

    def call() -> None:  # runs or waits, then stops at the 4 s timeout
        done.append(
            httpx.post(srv.url + "/v1/generate", json=body, timeout=60).json()["finish_reason"]
        )

    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            threads = [threading.Thread(target=call) for _ in range(2)]
            for t in threads:  # one runs, one waits
                t.start()
                time.sleep(0.5)
            r = c.post("/v1/generate", json=body)
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "rate_limit_error"
            assert c.get("/v1/stats").json()["requests"]["rejected"] == 1
            for t in threads:
                t.join()
    finally:
        srv.stop()
    assert done == ["timeout", "timeout"]


def test_client_disconnect_cancels_the_sequence(client):
    req = {"prompt": "abc", "max_new_tokens": 250, "stream": True}
    before = client.get("/v1/stats").json()["requests"]["finished"].get("cancelled", 0)
    with client.stream("POST", "/v1/generate", json=req) as s:
        for i, _ in enumerate(s.iter_lines()):
            if i > 4:
                break  # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stats = client.get("/v1/stats").json()
        if stats["requests"]["finished"].get("cancelled", 0) == before + 1:
            break
        time.sleep(0.1)
    assert stats["requests"]["finished"].get("cancelled", 0) == before + 1
    assert stats["requests"]["active"] == 0


def _signalled_stream(srv: ServerProcess, path: str, req: dict, *signals: int) -> list:
    """Stream `req`; after its first line send `signals` (0.5 s apart); the SSE it got."""
    with (
        httpx.Client(base_url=srv.url, timeout=60) as c,
        c.stream("POST", path, json=req) as s,
    ):
        lines = s.iter_lines()
        first = next(lines)
        for i, sig in enumerate(signals):  # while it streams
            time.sleep(0.5 if i else 0)
            srv.proc.send_signal(sig)
        return _sse([first, *lines])


def test_sigterm_drains_a_streaming_request(byte_ckpt):
    srv = ServerProcess(byte_ckpt)
    req = {"prompt": "x", "max_new_tokens": 200, "stream": True}
    events = _signalled_stream(srv, "/v1/generate", req, signal.SIGTERM)
    assert events[-1][0] == "done"
    assert len(json.loads(events[-1][1])["token_ids"]) == 200
    assert srv.proc.wait(30) == 0  # drained: a normal exit, the signal is not raised again
    assert "Traceback" not in srv.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(srv.url + "/health")


def test_ctrl_c_drains_like_sigterm_and_exits_0(byte_ckpt):
    srv = ServerProcess(byte_ckpt)
    req = {"model": "m", "prompt": "x", "max_tokens": 60, "stream": True, "temperature": 0}
    events = _signalled_stream(srv, "/v1/completions", req, signal.SIGINT)  # Ctrl-C
    assert events[-1][1] == "[DONE]"
    chunks = [json.loads(d) for _, d in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert srv.proc.wait(30) == 0  # drained: a normal exit
    out = srv.stop()
    assert "Traceback" not in out and "KeyboardInterrupt" not in out


def test_ctrl_c_on_an_idle_server_exits_0_without_a_traceback(byte_ckpt):
    srv = ServerProcess(byte_ckpt)
    srv.proc.send_signal(signal.SIGINT)
    assert srv.proc.wait(30) == 0
    assert "Traceback" not in srv.stop()


def test_a_second_ctrl_c_stops_at_once_with_130(byte_ckpt):
    srv = ServerProcess(byte_ckpt)
    req = {"prompt": "x", "max_new_tokens": 1000, "stream": True}
    events = _signalled_stream(srv, "/v1/generate", req, signal.SIGINT, signal.SIGINT)
    done = json.loads(events[-1][1])  # the request ends early, and says why
    assert events[-1][0] == "done" and done["finish_reason"] == "shutdown"
    assert len(done["token_ids"]) < 1000
    assert srv.proc.wait(30) == 130
    out = srv.stop()
    assert "Traceback" not in out and "stopped at once" in out
