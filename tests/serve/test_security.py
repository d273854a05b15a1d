"""API keys, per-key rate limits, private logs, refusal to serve open off loopback, HTTPS."""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
from starlette.routing import Route

from moekit import cli
from moekit.serve import security
from moekit.serve.app import create_app
from moekit.serve.security import (
    Guard,
    Rate,
    SecurityConfig,
    SecurityConfigError,
    check_bind,
    key_id,
    match_key,
    tls_options,
)

from .conftest import ServerProcess, free_port, make_model

K1 = "k1-0123456789abcdef-ABCDEF"
K2 = "k2-fedcba9876543210-zyxw~+/"
K3 = "k3-from-the-environment-000"
WRONG = "k9-not-a-key-of-this-server"
BODIES = {
    "/v1/generate": {"prompt": "a", "max_new_tokens": 1},
    "/v1/route": {"prompt": "a"},
    "/v1/completions": {"model": "m", "prompt": "a", "max_tokens": 1},
    "/v1/chat/completions": {
        "model": "m",
        "messages": [{"role": "user", "content": "a"}],
        "max_tokens": 1,
    },
}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# helpers, in process -----------------------------------------------------------------------
def test_match_key_compares_against_every_key_in_constant_time(monkeypatch):
    calls: list[tuple[bytes, bytes]] = []
    real = security.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(security.hmac, "compare_digest", spy)
    keys = (K1, K2, K3)
    assert match_key(K1, keys) == K1  # the first key matches, the other two are still compared
    assert len(calls) == 3 and all(len(a) == len(b) == 32 for a, b in calls)
    assert match_key(K3, keys) == K3 and len(calls) == 6
    assert match_key(WRONG, keys) is None and len(calls) == 9
    assert match_key("", keys) is None and match_key(K1[:-1], keys) is None


def test_guard_checks_keys_with_the_constant_time_helper(monkeypatch):
    seen: list[str] = []
    real = security.match_key
    monkeypatch.setattr(
        security, "match_key", lambda given, keys: seen.append(given) or real(given, keys)
    )
    guard = Guard(SecurityConfig(api_keys=(K1, K2)))
    assert guard.check("/v1/model", "", f"Bearer {K2}").response is None
    assert guard.check("/v1/model", "", f"bearer {WRONG}").response.status_code == 401
    assert guard.check("/v1/model", "", f"Basic {K1}").response.status_code == 401
    assert seen == [K2, WRONG, ""]  # a non-Bearer scheme is compared as an empty key
    assert guard.check("/health", "", None).response is None and len(seen) == 3


def test_rate_limit_buckets_are_per_key_and_refill():
    now = [0.0]
    guard = Guard(SecurityConfig(api_keys=(K1, K2), rate_limit="2/min"), clock=lambda: now[0])
    first = [guard.check("/v1/stats", "", f"Bearer {K1}").response for _ in range(3)]
    assert first[:2] == [None, None] and first[2].status_code == 429
    assert first[2].headers["retry-after"] == "30"  # one request per 30 s
    assert guard.check("/v1/stats", "", f"Bearer {K2}").response is None  # K2 is not starved
    now[0] = 29.0
    assert guard.check("/v1/stats", "", f"Bearer {K1}").response.headers["retry-after"] == "1"
    now[0] = 30.0
    assert guard.check("/v1/stats", "", f"Bearer {K1}").response is None
    assert guard.allowed[key_id(K1)] == 3 and guard.limited[key_id(K1)] == 2


def test_rate_parse():
    assert Rate.parse("5/s") == Rate(5, 1.0) and Rate.parse("300/min") == Rate(300, 60.0)
    assert Rate.parse(" 7 / hour ") == Rate(7, 3600.0)
    for bad in ("5", "0/s", "-1/s", "5/day", "five/s", "1.5/s"):
        with pytest.raises(ValueError, match="rate_limit"):
            Rate.parse(bad)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"api_keys": ("short",)}, "api_keys[0]"),
        ({"api_keys": (K1, "has a space in the key")}, "api_keys[1]"),
        ({"api_keys": (K1, K1)}, "api_keys"),
        ({"api_keys": K1}, "api_keys"),
        ({"rate_limit": "fast"}, "rate_limit"),
        ({"metrics_public": "yes"}, "metrics_public"),
        ({"log_prompts": 1}, "log_prompts"),
    ],
)
def test_security_config_refuses_bad_values_without_echoing_keys(kwargs, field):
    with pytest.raises(SecurityConfigError) as err:
        SecurityConfig(**kwargs)
    assert str(err.value).startswith(field) and isinstance(err.value, ValueError)
    assert "short" not in str(err.value) and "has a space" not in str(err.value)


def test_keys_come_from_flags_file_and_environment(tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"# deploy keys\n{K2}\n\n{K1}\n")
    cfg = SecurityConfig.from_options([K1], str(path), environ={"MOEKIT_API_KEY": f"{K3}, {K2}"})
    assert cfg.api_keys == (K1, K2, K3)
    assert SecurityConfig.from_options(environ={}).api_keys == ()
    with pytest.raises(SecurityConfigError, match="api_key_file"):
        SecurityConfig.from_options(api_key_file=str(tmp_path / "missing"), environ={})


def test_key_id_is_short_and_not_the_key():
    assert len(key_id(K1)) == 8 and key_id(K1) != key_id(K2) and key_id(K1) not in K1


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"])
def test_loopback_serves_without_a_key(host):
    check_bind(host, SecurityConfig(), allow_unauthenticated=False)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "example.org"])
def test_other_hosts_need_a_key_or_an_explicit_opt_out(host):
    with pytest.raises(SecurityConfigError, match="--api-key"):
        check_bind(host, SecurityConfig(), allow_unauthenticated=False)
    check_bind(host, SecurityConfig(api_keys=(K1,)), allow_unauthenticated=False)
    check_bind(host, SecurityConfig(), allow_unauthenticated=True)


def test_tls_options_need_existing_files(tmp_path):
    assert tls_options(None, None) == {}
    with pytest.raises(SecurityConfigError, match="ssl_keyfile"):
        tls_options(None, str(tmp_path / "key.pem"))
    with pytest.raises(SecurityConfigError, match="ssl_certfile"):
        tls_options(str(tmp_path / "cert.pem"), None)


# processes ---------------------------------------------------------------------------------
def test_refuses_to_bind_all_interfaces_without_a_key(byte_ckpt, monkeypatch, capsys):
    monkeypatch.delenv("MOEKIT_API_KEY", raising=False)
    cmd = [sys.executable, "-m", "moekit.serve", str(byte_ckpt), "--host", "0.0.0.0"]
    r = subprocess.run([*cmd, "--port", str(free_port())], capture_output=True, timeout=60)
    err = r.stderr.decode().strip()
    assert r.returncode == 2 and "\n" not in err and "--api-key" in err and "0.0.0.0" in err
    with pytest.raises(SystemExit) as stop:
        cli.main(["serve", str(byte_ckpt), "--host", "0.0.0.0"])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and "\n" not in err and "--allow-unauthenticated" in err


@pytest.fixture(scope="module")
def secure_server(byte_ckpt, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    key_file.write_text(K2 + "\n")
    opts = ("--api-key", K1, "--api-key-file", str(key_file))
    srv = ServerProcess(byte_ckpt, *opts, env={"MOEKIT_API_KEY": K3})
    yield srv
    srv.stop()


def _routes() -> list[tuple[str, str]]:
    """(method, path) of every route the app has: its operations and its documentation pages."""
    app = create_app(make_model())
    out = {(m.upper(), path) for path, ops in app.openapi()["paths"].items() for m in ops}
    out |= {(sorted(r.methods - {"HEAD"})[0], r.path) for r in app.routes if isinstance(r, Route)}
    return sorted(out)


def test_auth_matrix_over_every_route(secure_server):
    routes = _routes()
    assert {p for _, p in routes} >= {"/health", "/metrics", "/docs", "/openapi.json", *BODIES}
    with httpx.Client(base_url=secure_server.url, timeout=60) as c:

        def call(method: str, path: str, headers=None, params=None) -> httpx.Response:
            body = BODIES.get(path)
            return c.request(method, path, json=body, headers=headers, params=params)

        for method, path in routes:
            if path == "/health":
                assert call(method, path).status_code == 200
                continue
            refused = [
                call(method, path),
                call(method, path, bearer(WRONG)),
                call(method, path, {"Authorization": K1}),  # no scheme
                call(method, path, params={"api_key": K1}),
                call(method, path, bearer(K1), params={"api_key": K1}),
                call(method, path, bearer(K1), params={"token": WRONG}),
            ]
            for r in refused:
                assert r.status_code == 401, (method, path, r.status_code)
                assert r.headers["www-authenticate"] == "Bearer"
                assert K1 not in r.text and WRONG not in r.text
                assert r.json()["error"]["type"] == "authentication_error"
            assert refused[0].text == refused[1].text  # nothing tells a wrong key from none
            for key in (K1, K2, K3):  # flag, file, environment
                ok = call(method, path, bearer(key))
                assert ok.status_code == 200, (method, path, ok.text)
        assert c.get("/no/such/route").status_code == 401  # routes are not revealed either
        schema = c.get("/openapi.json", headers=bearer(K1)).json()
    assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert "security" not in schema["paths"]["/health"]["get"]
    assert schema["paths"]["/v1/generate"]["post"]["security"] == [{"bearer": []}]


def test_rate_limit_answers_429_per_key_and_counts_in_metrics(byte_ckpt):
    opts = ("--api-key", K1, "--api-key", K2, "--rate-limit", "3/min", "--metrics-public")
    srv = ServerProcess(byte_ckpt, *opts)
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            codes = [c.get("/v1/model", headers=bearer(K1)).status_code for _ in range(3)]
            limited = c.get("/v1/stats", headers=bearer(K1))
            assert codes == [200, 200, 200] and limited.status_code == 429
            assert 1 <= int(limited.headers["retry-after"]) <= 20
            assert limited.json()["error"]["type"] == "rate_limit_error"
            assert c.post(
                "/v1/generate", json=BODIES["/v1/generate"], headers=bearer(K2)
            ).is_success
            assert c.get("/v1/model").status_code == 401
            metrics = c.get("/metrics")  # public: no key, and not counted against one
        text = metrics.text
        assert metrics.status_code == 200 and K1 not in text and K2 not in text
        assert f'moekit_client_requests_total{{key_id="{key_id(K1)}"}} 3.0' in text
        assert f'moekit_client_rate_limited_total{{key_id="{key_id(K1)}"}} 1.0' in text
        assert f'moekit_client_requests_total{{key_id="{key_id(K2)}"}} 1.0' in text
        assert "moekit_unauthorized_requests_total 1.0" in text
    finally:
        srv.stop()


def test_logs_hold_neither_prompts_nor_keys(byte_ckpt):
    secret = "a-private-prompt-xyzzy"
    srv = ServerProcess(byte_ckpt, "--api-key", K1, "--log-level", "info")
    try:
        with httpx.Client(base_url=srv.url, timeout=60, headers=bearer(K1)) as c:
            for stream in (False, True):
                body = {"prompt": secret, "max_new_tokens": 4, "stream": stream}
                assert c.post("/v1/generate", json=body).status_code == 200
            body = {"model": "m", "prompt": secret, "max_tokens": 4}
            assert c.post("/v1/completions", json=body).status_code == 200
            assert c.get("/v1/model", params={"api_key": K1}).status_code == 401
            assert c.get("/v1/model", headers=bearer(WRONG)).status_code == 401
    finally:
        out = srv.stop()
    assert f"{key_id(K1)} POST /v1/generate 200" in out  # the access log names the key id
    assert "- GET /v1/model 401" in out
    assert secret not in out and K1 not in out and WRONG not in out


def _self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key: `cryptography` if installed, else openssl."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        if shutil.which("openssl") is None:
            pytest.skip("needs the cryptography package or the openssl command")
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
            + ["-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1"]
            + ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
            check=True,
            capture_output=True,
        )
        return cert, key
    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    ip = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([ip]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(private.public_key()), False)
        .sign(private, hashes.SHA256())
    )
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert, key


def test_https_round_trip_with_the_openai_client(byte_ckpt, tmp_path):
    cert, key = _self_signed(tmp_path)
    trust = ssl.create_default_context(cafile=str(cert))
    opts = ("--ssl-certfile", str(cert), "--ssl-keyfile", str(key), "--api-key", K1)
    srv = ServerProcess(byte_ckpt, *opts, "--log-prompts", "--log-level", "info", tls=trust)
    try:
        assert srv.url.startswith("https://")
        with httpx.Client(verify=trust, timeout=60) as http:
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key=K1, http_client=http)
            r = client.completions.create(model="ck", prompt="def f", max_tokens=6, temperature=0)
            assert r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "length"
            anonymous = openai.OpenAI(
                base_url=srv.url + "/v1", api_key=WRONG, http_client=http, max_retries=0
            )
            with pytest.raises(openai.AuthenticationError):
                anonymous.completions.create(model="ck", prompt="x", max_tokens=1)
        with pytest.raises(httpx.HTTPError):  # the port speaks TLS only
            httpx.get(f"http://127.0.0.1:{srv.port}/health", timeout=5)
    finally:
        out = srv.stop()
    assert "prompt='def f'" in out and K1 not in out  # --log-prompts logs text, never keys
