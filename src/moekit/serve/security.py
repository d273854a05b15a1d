"""Who may call the server and how often: API keys, per-key rate limits, the access log.

`SecurityConfig` holds the policy; `SecurityMiddleware` enforces it on every HTTP request
except /health before routing or body parsing, so a caller without a key learns nothing about
routes or inputs. Keys never reach logs, errors or metrics: those name a key by `key_id`.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import math
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from moekit.serve.inputs import error_response

ENV_VAR = "MOEKIT_API_KEY"  # one key, or several separated by commas
OPEN_PATHS = frozenset({"/health"})  # answered without a key (liveness probes)
ANONYMOUS = "anonymous"  # client id when the server has no keys: one bucket for everyone
MIN_KEY_CHARS = 16  # short keys could be guessed through the 401s
# RFC 6750 b64token: the characters a Bearer credential may hold
_KEY_FORM = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_UNITS = {"s": 1, "sec": 1, "second": 1, "min": 60, "minute": 60, "h": 3600, "hour": 3600}
# query parameters that look like a credential: refused so keys stay out of URLs and logs
_QUERY_KEY_NAMES = frozenset({"api_key", "api-key", "apikey", "key", "token", "access_token"})
_AUTH_HEADERS = {"WWW-Authenticate": "Bearer"}
_NO_KEY = "missing or invalid API key: send the header 'Authorization: Bearer <key>'"
_KEY_IN_URL = "API keys are refused in the URL: send the header 'Authorization: Bearer <key>'"

access_log = logging.getLogger("moekit.serve.access")
prompt_log = logging.getLogger("moekit.serve.prompts")


class SecurityConfigError(ValueError):
    """A security setting the server cannot start with; the message is one line."""


def key_id(key: str) -> str:
    """A short non-reversible name of a key (first 8 hex of its SHA-256) for logs and metrics."""
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def match_key(given: str, keys: Iterable[str]) -> str | None:
    """The configured key equal to `given`, or None, in time independent of which one matches.

    Both sides are hashed so lengths never matter, and every key is compared (no early exit).
    """
    digest = hashlib.sha256(given.encode("utf-8", "surrogateescape")).digest()
    found = None
    for key in keys:
        if hmac.compare_digest(digest, hashlib.sha256(key.encode()).digest()):
            found = key
    return found


@dataclass(frozen=True)
class Rate:
    """`count` requests per `period_s` seconds: a bucket of `count` refilled evenly."""

    count: int
    period_s: float

    @classmethod
    def parse(cls, text: str) -> Rate:
        """'5/s', '300/min' or '1000/h'."""
        m = re.fullmatch(r"\s*(\d+)\s*/\s*([a-z]+)\s*", str(text).lower())
        if m is None or m.group(2) not in _UNITS or int(m.group(1)) < 1:
            raise SecurityConfigError(
                f"rate_limit={text!r} must look like '5/s', '300/min', '1000/h'"
            )
        return cls(int(m.group(1)), float(_UNITS[m.group(2)]))


class TokenBucket:
    """Up to `rate.count` requests at once, refilled at count / period_s per second."""

    def __init__(self, rate: Rate, now: float) -> None:
        self.capacity = float(rate.count)
        self.per_s = rate.count / rate.period_s
        self.tokens, self.t = self.capacity, now

    def take(self, now: float) -> float:
        """Spend one request; returns 0.0, or the seconds until one is available (nothing spent)."""
        self.tokens = min(self.capacity, self.tokens + (now - self.t) * self.per_s)
        self.t = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.per_s


@dataclass(frozen=True)
class SecurityConfig:
    """Access policy of the HTTP server; bad values raise SecurityConfigError (a ValueError)."""

    api_keys: tuple[str, ...] = ()  # Bearer keys accepted; empty = no authentication
    rate_limit: str | None = None  # per key, e.g. "5/s" or "300/min"; None = unlimited
    metrics_public: bool = False  # /metrics without a key (a scraper on a private network)
    log_prompts: bool = False  # log prompt and completion text (off: logs hold no user text)

    def __post_init__(self) -> None:
        keys = self.api_keys
        if isinstance(keys, str) or not all(isinstance(k, str) for k in keys):
            raise SecurityConfigError("api_keys must be a sequence of strings")
        object.__setattr__(self, "api_keys", tuple(keys))
        for i, key in enumerate(self.api_keys):  # the message never repeats the key
            if len(key) < MIN_KEY_CHARS or not _KEY_FORM.fullmatch(key):
                raise SecurityConfigError(
                    f"api_keys[{i}] must be {MIN_KEY_CHARS}+ characters of A-Z a-z 0-9 - . _ ~ + /"
                    " (e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
                )
        if len({key_id(k) for k in self.api_keys}) != len(self.api_keys):
            raise SecurityConfigError("api_keys holds the same key twice")
        if self.rate_limit is not None:
            Rate.parse(self.rate_limit)
        for name in ("metrics_public", "log_prompts"):
            if not isinstance(getattr(self, name), bool):
                raise SecurityConfigError(f"{name}={getattr(self, name)!r} must be a bool")

    @property
    def rate(self) -> Rate | None:
        return None if self.rate_limit is None else Rate.parse(self.rate_limit)

    @classmethod
    def from_options(
        cls,
        api_keys: Iterable[str] = (),
        api_key_file: str | None = None,
        environ: Mapping[str, str] | None = None,
        **options: object,
    ) -> SecurityConfig:
        """Keys from `api_keys`, then `api_key_file` (one a line, # comments), then $MOEKIT_API_KEY
        (comma-separated), repeats dropped; so keys can stay out of shell history."""
        keys = list(api_keys)
        if api_key_file is not None:
            try:
                lines = Path(api_key_file).read_text().splitlines()
            except OSError as err:
                raise SecurityConfigError(
                    f"api_key_file: cannot read {api_key_file}: {err.strerror}"
                ) from None
            keys += [s for line in lines if (s := line.strip()) and not s.startswith("#")]
        env = os.environ if environ is None else environ
        keys += [s for part in env.get(ENV_VAR, "").split(",") if (s := part.strip())]
        return cls(api_keys=tuple(dict.fromkeys(keys)), **options)  # type: ignore[arg-type]


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def check_bind(host: str, cfg: SecurityConfig, allow_unauthenticated: bool) -> None:
    """Refuse to serve without keys on an address other machines can reach."""
    if cfg.api_keys or allow_unauthenticated or is_loopback(host):
        return
    raise SecurityConfigError(
        f"refusing to serve on host={host!r} without an API key: anyone who reaches it could use"
        f" it; pass --api-key (or {ENV_VAR}, --api-key-file), or --allow-unauthenticated"
    )


def tls_options(certfile: str | None, keyfile: str | None) -> dict[str, str]:
    """uvicorn's ssl_* options; the key may sit in the certificate file."""
    if certfile is None:
        if keyfile is not None:
            raise SecurityConfigError("ssl_keyfile needs ssl_certfile")
        return {}
    out = {"ssl_certfile": certfile} | ({} if keyfile is None else {"ssl_keyfile": keyfile})
    for name, path in out.items():
        if not Path(path).is_file():
            raise SecurityConfigError(f"{name}: no such file {path}")
    return out


def log_exchange(cfg: SecurityConfig, request_id: str, prompt: object, completion: object) -> None:
    """Log a request's text only when the operator asked for it (--log-prompts)."""
    if cfg.log_prompts:
        prompt_log.info("%s prompt=%r completion=%r", request_id, prompt, completion)


@dataclass
class Verdict:
    """How one request is answered: let through as `client`, or refused with `response`."""

    client: str  # key id, ANONYMOUS, or "-" (open path or refused)
    response: Response | None = None


class Guard:
    """Per-request decisions and per-client counts; used from one event loop, so no lock."""

    def __init__(self, cfg: SecurityConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg, self._clock, self._rate = cfg, clock, cfg.rate
        self._ids = {key: key_id(key) for key in cfg.api_keys}
        self._buckets: dict[str, TokenBucket] = {}  # at most one per key: bounded
        self.allowed: Counter[str] = Counter()
        self.limited: Counter[str] = Counter()
        self.unauthorized = 0

    def clients(self) -> list[str]:
        return list(self._ids.values()) if self._ids else [ANONYMOUS]

    def is_open(self, path: str) -> bool:
        """Answered without a key: /health, and /metrics when public."""
        return path in OPEN_PATHS or (path == "/metrics" and self.cfg.metrics_public)

    def check(self, path: str, query: str, authorization: str | None) -> Verdict:
        if self.is_open(path):
            return Verdict("-")
        client = ANONYMOUS
        if self.cfg.api_keys:
            if any(
                name.lower() in _QUERY_KEY_NAMES
                for name, _ in parse_qsl(query, keep_blank_values=True)
            ):
                return self._refuse(_KEY_IN_URL)
            scheme, _, token = (authorization or "").partition(" ")
            key = match_key(token.strip() if scheme.lower() == "bearer" else "", self.cfg.api_keys)
            if key is None:
                return self._refuse(_NO_KEY)
            client = self._ids[key]
        if self._rate is not None:
            if client not in self._buckets:
                self._buckets[client] = TokenBucket(self._rate, self._clock())
            wait = self._buckets[client].take(self._clock())
            if wait > 0:
                self.limited[client] += 1
                retry = {"Retry-After": str(max(1, math.ceil(wait)))}
                msg = f"rate limit {self.cfg.rate_limit} reached for this key"
                return Verdict(client, error_response(429, msg, "rate_limit_error", None, retry))
        self.allowed[client] += 1
        return Verdict(client)

    def _refuse(self, message: str) -> Verdict:
        self.unauthorized += 1
        return Verdict(
            "-", error_response(401, message, "authentication_error", None, _AUTH_HEADERS)
        )


class GuardCollector(Collector):
    """Prometheus counters of a `Guard`, labelled by key id (never by key)."""

    def __init__(self, guard: Guard) -> None:
        self.guard = guard

    def collect(self) -> Iterator[Metric]:
        g = self.guard
        ok = CounterMetricFamily(
            "moekit_client_requests", "Requests let through, by API key id", labels=["key_id"]
        )
        limited = CounterMetricFamily(
            "moekit_client_rate_limited",
            "Requests refused (429) by the per-key rate limit",
            labels=["key_id"],
        )
        for client in g.clients():
            ok.add_metric([client], g.allowed[client])
            limited.add_metric([client], g.limited[client])
        yield ok
        yield limited
        yield CounterMetricFamily(
            "moekit_unauthorized_requests", "Requests refused (401)", g.unauthorized
        )


class SecurityMiddleware:
    """ASGI middleware: the `Guard` decides before routing; one access-log line per request.

    The line holds the client's key id, method, path (never the query string), status and time.
    """

    def __init__(self, app: ASGIApp, guard: Guard) -> None:
        self.app, self.guard = app, guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.monotonic(), 0
        query = scope.get("query_string", b"").decode("latin-1")
        verdict = self.guard.check(scope["path"], query, Headers(scope=scope).get("authorization"))

        async def send_seen(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            app = verdict.response if verdict.response is not None else self.app
            await app(scope, receive, send_seen)
        finally:
            path = repr(scope["path"])[1:-1]  # escapes control characters
            ms = 1000 * (time.monotonic() - start)
            access_log.info("%s %s %s %d %.1fms", verdict.client, scope["method"], path, status, ms)
