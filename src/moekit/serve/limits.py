"""HTTP limits in front of the routes: body size, valid Unicode, disconnects, draining.

`BodyGuard` reads a request body before any route does: one announced (Content-Length) or
found to be larger than `max_bytes` is answered 413 without reading the rest, and JSON holding
text that is not valid Unicode (a lone surrogate such as "\\ud800") is answered 422 naming the
field, so no handler meets text it cannot encode. A client that disconnects cancels its
request, streamed or not. `DrainGate` counts requests in flight and, once `DrainingServer`
has seen SIGTERM or SIGINT, answers new ones 503 with Retry-After while those finish; then
the server stops. Both sit inside the API-key check.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import time
from types import FrameType
from typing import Any

import anyio
import uvicorn
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from moekit.serve.inputs import error_response

log = logging.getLogger(__name__)
FORCED_GRACE_S = 2.0  # a forced stop waits this long for handlers to send their end
DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: far above any prompt the engine accepts
# a JSON escape of a UTF-16 surrogate; only these can put invalid Unicode into a parsed str
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def invalid_text_field(value: Any, path: tuple[str, ...] = ()) -> str | None:
    """Dotted path of the first string (or key) in parsed JSON that is not valid Unicode."""
    if isinstance(value, str):
        return None if _encodes(value) else ".".join(path) or "body"
    if isinstance(value, dict):
        for key, item in value.items():
            if not _encodes(key):
                return ".".join(path) or "body"
            found = invalid_text_field(item, (*path, key))
            if found is not None:
                return found
    if isinstance(value, list):
        for i, item in enumerate(value):
            found = invalid_text_field(item, (*path, str(i)))
            if found is not None:
                return found
    return None


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _content_length(scope: Scope) -> int | None:
    value = Headers(scope=scope).get("content-length")
    return int(value) if value is not None and value.isdigit() else None


class BodyGuard:
    """ASGI middleware: 413 above `max_bytes` (before reading it whole), 422 for invalid text."""

    def __init__(self, app: ASGIApp, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = error_response(
            413, f"request body exceeds {self.max_bytes} bytes", "invalid_request_error", "body"
        )
        announced = _content_length(scope)
        if announced is not None and announced > self.max_bytes:
            await too_large(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:  # chunked, or more than announced
                await too_large(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        problem = _invalid_text(body, Headers(scope=scope).get("content-type", ""))
        if problem is not None:
            field, text = problem
            await error_response(422, text, "invalid_request_error", field)(scope, receive, send)
            return
        await run_until_disconnect(self.app, scope, _replay(body, receive), receive, send)


async def run_until_disconnect(
    app: ASGIApp, scope: Scope, app_receive: Receive, receive: Receive, send: Send
) -> None:
    """Run `app` for a request whose body was read; cancel it if the client disconnects first.

    A handler waiting on the engine (a plain, non-streaming request) is cancelled like a
    stream whose client left: its sequence is dropped instead of decoded for no one.
    """
    finished, error = False, None

    async def sent(message: Message) -> None:
        nonlocal finished
        await send(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            finished = True

    async with anyio.create_task_group() as tasks:

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                continue
            if not finished:  # after the answer, uvicorn reports a disconnect as well
                tasks.cancel_scope.cancel()

        tasks.start_soon(watch)
        try:
            await app(scope, app_receive, sent)
        except Exception as err:  # raised below as itself, not inside an exception group
            error = err
        tasks.cancel_scope.cancel()  # the answer is out: stop watching
    if error is not None:
        raise error


def _invalid_text(body: bytes, content_type: str) -> tuple[str, str] | None:
    """(field, message) when a JSON body is not UTF-8 or holds a lone surrogate, else None."""
    if not body or (content_type and "json" not in content_type.lower()):
        return None
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as err:
        return "body", f"body: not valid UTF-8 (byte {err.start})"
    if not _SURROGATE_ESCAPE.search(body):  # the common case: nothing to parse twice
        return None
    try:
        field = invalid_text_field(json.loads(body))
    except ValueError:  # not JSON: the route answers that itself
        return None
    return None if field is None else (field, f"{field}: not valid Unicode (lone surrogate)")


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the body read ahead once, then the client's own messages."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # e.g. http.disconnect, which cancels the request

    return replay


class Drain:
    """HTTP requests in flight, and whether the server is draining (refusing new ones)."""

    def __init__(self, retry_after_s: int = 1) -> None:
        self.in_flight = 0
        self.draining = False
        self.stop_now = False  # a second signal: the engine ends what runs instead of finishing
        self.retry_after_s = retry_after_s


class DrainGate:
    """ASGI middleware: counts requests in flight; while draining, answers new ones 503."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app, self.drain = app, drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.drain.draining:
            retry = {"Retry-After": str(self.drain.retry_after_s)}
            message = "server is shutting down; retry on another replica or after Retry-After"
            refuse = error_response(503, message, "server_shutting_down", None, retry)
            await refuse(scope, receive, send)
            return
        self.drain.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.in_flight -= 1


class DrainingServer(uvicorn.Server):
    """uvicorn, but the first SIGTERM / SIGINT (Ctrl-C) drains: new requests get 503 while
    those in flight finish (at most `timeout_s`), then the server stops as uvicorn does. A
    second signal stops it at once (`forced`). The signal is not raised again afterwards,
    so a drained stop ends the process normally, without a traceback."""

    def __init__(self, config: uvicorn.Config, drain: Drain, timeout_s: float) -> None:
        super().__init__(config)
        self.drain, self.timeout_s = drain, timeout_s
        self._signal: int | None = None
        self._deadline = 0.0
        self.forced = False  # a second signal cut the requests still in flight

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._signal is not None or self.should_exit:  # asked twice: stop now
            self.forced = self.drain.in_flight > 0
            self.should_exit = self.force_exit = self.drain.stop_now = True
            return
        if self.drain.in_flight == 0:  # nothing to drain
            self.should_exit = True
            return
        self._signal, self._deadline = sig, time.monotonic() + self.timeout_s
        self.drain.draining = True
        log.warning(
            "draining %d request(s) in flight; new ones get 503 (signal again to stop at once)",
            self.drain.in_flight,
        )

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if not self.force_exit:
            await super().shutdown(sockets)
            return
        # stopping now: the engine ends every request ('shutdown') so each handler sends its
        # end and returns; uvicorn skips the app's shutdown when forced, so it runs first here
        await self.lifespan.shutdown()
        await super().shutdown(sockets)
        deadline = time.monotonic() + FORCED_GRACE_S
        while self.server_state.tasks and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def on_tick(self, counter: int) -> bool:
        drained = self.drain.in_flight == 0 or time.monotonic() > self._deadline
        if self._signal is not None and not self.should_exit and drained:
            self.should_exit = True
        return await super().on_tick(counter)
