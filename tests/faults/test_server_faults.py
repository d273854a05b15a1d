"""Bad or unlucky HTTP requests: invalid Unicode, huge bodies, clients that leave, shutdown.

The server runs in this process on a thread (uvicorn on a free loopback port), as
`moekit serve` runs it, so SIGTERM is `handle_exit` called directly.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn
from tests.tiny import tiny_model

from moekit.serve.app import create_app
from moekit.serve.config import EngineConfig
from moekit.serve.limits import DrainingServer
from moekit.serve.security import SecurityConfig
from moekit.serve.server import bind_socket
from moekit.serve.server import main as serve_main

KEY = "k" * 32
LIMIT = 4096  # body bytes the test servers accept


class ThreadServer:
    """A byte-level tiny model served on a thread; `url`, `server` (a DrainingServer).

    With `hold`, GET /hold answers only once the event is set: a request kept in flight.
    """

    def __init__(
        self, security: SecurityConfig | None = None, hold: threading.Event | None = None
    ) -> None:
        model = tiny_model(0, vocab_size=256, max_seq_len=64).eval()
        engine = EngineConfig(max_body_bytes=LIMIT, max_new_tokens=4096)
        app = create_app(model, name="tiny", engine=engine, security=security)
        if hold is not None:

            @app.get("/hold")
            async def held() -> dict:
                while not hold.is_set():
                    await asyncio.sleep(0.01)
                return {"held": True}

        sock = bind_socket("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=30)
        self.server = DrainingServer(config, app.state.drain, timeout_s=30)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]})
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive()
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)


def _wait_for(check, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def srv() -> Iterator[ThreadServer]:
    server = ThreadServer()
    yield server
    server.stop()


@pytest.fixture
def client(srv) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        yield c


def _post(client: httpx.Client, path: str, raw: bytes, **kw) -> httpx.Response:
    return client.post(path, content=raw, headers={"content-type": "application/json"}, **kw)


@pytest.mark.parametrize(
    "path, body, field",
    [
        ("/v1/generate", rb'{"prompt": "\ud800", "max_new_tokens": 2}', "prompt"),
        ("/v1/completions", rb'{"model": "m", "prompt": "ab\udfff"}', "prompt"),
        ("/v1/completions", rb'{"model": "\ud800", "prompt": "ab"}', "model"),
        ("/v1/route", rb'{"prompt": "\udc00x"}', "prompt"),
        ("/v1/generate", b'{"prompt": "\xff"}', "body"),  # raw bytes that are not UTF-8
    ],
)
def test_invalid_unicode_is_422_naming_the_field(client, path, body, field):
    r = _post(client, path, body)
    assert r.status_code == 422 and r.json()["error"]["field"] == field


def test_a_valid_surrogate_pair_is_one_character(client):
    r = _post(client, "/v1/route", rb'{"prompt": "\ud83d\ude00"}')
    assert r.status_code == 200 and r.json()["positions"] == 4  # U+1F600: four UTF-8 bytes


def test_a_body_over_the_limit_is_413_announced_or_streamed(client):
    big = b'{"prompt": "' + b"a" * (2 * LIMIT) + b'"}'
    assert _post(client, "/v1/generate", big).status_code == 413  # Content-Length says so

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        for start in range(0, len(big), 1024):
            yield big[start : start + 1024]

    r = _post(client, "/v1/generate", chunks())
    assert r.status_code == 413 and r.json()["error"]["field"] == "body"
    assert client.get("/health").status_code == 200


def test_models_lists_the_served_model(client):
    r = client.get("/v1/models")
    assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == ["tiny"]


def test_a_plain_request_is_cancelled_when_its_client_leaves(srv, client):
    def finished() -> dict:
        return client.get("/v1/stats").json()["requests"]["finished"]

    before = finished().get("cancelled", 0)
    long = {"prompt": "ab", "max_new_tokens": 4096}
    with httpx.Client(base_url=srv.url) as leaving, pytest.raises(httpx.ReadTimeout):
        leaving.post("/v1/generate", json=long, timeout=httpx.Timeout(60, read=0.5))
    _wait_for(lambda: finished().get("cancelled", 0) == before + 1, "the cancel")
    assert client.get("/v1/stats").json()["requests"]["active"] == 0


def test_auth_answers_before_the_body_limit():
    server = ThreadServer(SecurityConfig.from_options([KEY]))
    try:
        big = b'{"prompt": "' + b"a" * (2 * LIMIT) + b'"}'
        with httpx.Client(base_url=server.url, timeout=60) as c:
            assert _post(c, "/v1/generate", big).status_code == 401
            auth = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
            assert c.post("/v1/generate", content=big, headers=auth).status_code == 413
    finally:
        server.stop()


def test_sigterm_drains_new_requests_get_503_in_flight_ones_finish():
    hold = threading.Event()
    server = ThreadServer(hold=hold)
    answers: list[httpx.Response] = []
    with httpx.Client(base_url=server.url, timeout=60) as c:
        worker = threading.Thread(target=lambda: answers.append(c.get("/hold")))
        worker.start()
        _wait_for(lambda: server.server.drain.in_flight == 1, "the request in flight")
        server.server.handle_exit(signal.SIGTERM, None)
        with httpx.Client(base_url=server.url, timeout=60) as other:
            refused = other.post("/v1/generate", json={"prompt": "ab", "max_new_tokens": 2})
            health = other.get("/health")
        assert server.thread.is_alive()  # still serving: one request in flight
        hold.set()
        worker.join(60)
    server.thread.join(60)
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["type"] == "server_shutting_down"
    assert health.status_code == 503
    (done,) = answers
    assert done.status_code == 200 and done.json() == {"held": True}
    assert not server.thread.is_alive()  # stopped once nothing was in flight


@pytest.mark.parametrize(
    "argv, named",
    [
        (["/no/such/ckpt", "--port", "0"], "no such checkpoint"),
        (["/no/such/ckpt", "--port", "99999"], "port=99999 must be in [0, 65535]"),
        (["/no/such/ckpt", "--port", "0", "--max-body-bytes", "0"], "max_body_bytes=0"),
    ],
)
def test_python_dash_m_serve_refuses_in_one_line(capsys, argv, named):
    with pytest.raises(SystemExit) as stop:
        serve_main(argv)
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and err.startswith("python -m moekit.serve: error: ")
    assert named in err and "\n" not in err


def test_python_dash_m_serve_refuses_a_taken_port_in_one_line(capsys, tmp_path):
    sock = bind_socket("127.0.0.1", 0)
    sock.listen()
    port = str(sock.getsockname()[1])
    try:
        with pytest.raises(SystemExit) as stop:
            serve_main([str(tmp_path), "--port", port, "--max-model-len", "32"])
    finally:
        sock.close()
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and f"port {port} on 127.0.0.1 is already in use" in err
    assert "\n" not in err
    with pytest.raises(SystemExit) as version:
        serve_main(["--version"])
    assert version.value.code == 0 and capsys.readouterr().out.startswith("moekit ")
