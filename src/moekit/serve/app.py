"""`create_app`: the FastAPI application around one model and its engine.

Client mistakes come back as 4xx with an `ErrorResponse` naming the field; an unexpected
error in a handler is logged and answered 500 without stopping the server. Keys and rate
limits (`SecurityConfig`) are enforced by a middleware before any route runs; CORS, when
origins are given, wraps it, so a browser's preflight is answered without a key.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from moekit.model.codec import Codec, load_codec
from moekit.model.transformer import Transformer
from moekit.serve import openai_chat, openai_compat, routes
from moekit.serve.config import EngineConfig
from moekit.serve.engine import Engine
from moekit.serve.inputs import ApiError, error_response
from moekit.serve.limits import BodyGuard, Drain, DrainGate
from moekit.serve.metrics import build_registry
from moekit.serve.schemas import ErrorResponse
from moekit.serve.security import Guard, GuardCollector, SecurityConfig, SecurityMiddleware
from moekit.serve.state import ServerState

log = logging.getLogger(__name__)
ERRORS: dict[int | str, dict[str, Any]] = {
    422: {"model": ErrorResponse, "description": "Invalid request (the field is named)"},
    429: {"model": ErrorResponse, "description": "Busy or rate-limited; retry after Retry-After s"},
}
UNAUTHORIZED = {
    "description": "Missing or invalid API key",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
}


def _field(loc: tuple | list) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or "body"


def _install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError) -> JSONResponse:
        return error_response(err.status, err.message, err.kind, err.field, err.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        errors = err.errors()
        first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
        body_broken = first.get("type") == "json_invalid"
        field = "body" if body_broken else _field(first.get("loc", ()))
        detail = [
            {"field": _field(e.get("loc", ())), "message": e.get("msg", ""), "type": e.get("type")}
            for e in errors
        ]
        message = f"{field}: {first.get('msg', 'invalid')}"
        return error_response(422, message, "invalid_request_error", field, detail=detail)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        return error_response(err.status_code, str(err.detail), "http_error", None, err.headers)

    @app.exception_handler(Exception)
    async def crash(_: Request, err: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, f"internal error: {type(err).__name__}", "server_error", None)


def create_app(
    model: Transformer,
    name: str = "moekit",
    engine: EngineConfig | None = None,
    security: SecurityConfig | None = None,
    codec: Codec | None = None,
    cors_origins: tuple[str, ...] | list[str] = (),
    served_model_name: str | None = None,
) -> FastAPI:
    """A FastAPI app serving `model`; its engine starts and drains with the app's lifespan.

    `security` (default: no keys, no rate limit) is checked before any route runs. `codec`
    turns text into ids and back (default: `load_codec(model)`: the model's tokenizer, or
    UTF-8 bytes). `cors_origins` ('*' for any) may call it from a browser.
    `served_model_name` replaces `name` in /health and /v1/models and is the `model` of every
    OpenAI answer (without it, answers repeat the name the request gave).
    """
    name = served_model_name or name
    cfg = engine or EngineConfig()
    policy = security or SecurityConfig()
    guard = Guard(policy)
    device = next(model.parameters()).device
    text = codec if codec is not None else load_codec(model)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        eng = Engine(model, cfg)
        registry = build_registry(eng)
        registry.register(GuardCollector(guard))
        app.state.serve = ServerState(
            model, name, cfg, eng, device, registry, text, served_name=served_model_name
        )
        eng.start()
        try:
            yield
        finally:
            # in-flight requests finish first, unless a second signal asked to stop now
            await eng.stop(timeout=0 if app.state.drain.stop_now else None)

    app = FastAPI(
        title="moekit inference server",
        summary=f"Serving {name}: generation, OpenAI-compatible completions, routing inspection",
        version="1",
        lifespan=lifespan,
        responses=ERRORS,
    )
    app.state.security = policy
    _install_handlers(app)
    app.include_router(routes.router)
    app.include_router(openai_compat.router)
    app.include_router(openai_chat.router)
    app.state.drain = Drain(cfg.retry_after_s)  # DrainingServer sets it on SIGTERM
    app.add_middleware(BodyGuard, max_bytes=cfg.max_body_bytes)
    app.add_middleware(DrainGate, drain=app.state.drain)
    app.add_middleware(SecurityMiddleware, guard=guard)  # outside both: keys first
    if cors_origins:  # added last: outermost, so preflights never meet the key check
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=["Retry-After"],
        )
    if policy.api_keys:
        _document_bearer(app, guard.is_open)
    return app


def _document_bearer(app: FastAPI, is_open: Callable[[str], bool]) -> None:
    """Declare the Bearer scheme in the OpenAPI schema (so /docs can send a key)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
            schemes["bearer"] = {"type": "http", "scheme": "bearer"}
            for path, operations in schema["paths"].items():
                for op in operations.values():
                    if not is_open(path):
                        op["security"] = [{"bearer": []}]
                        op["responses"]["401"] = UNAUTHORIZED
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]


def default_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
