"""`create_app`: the FastAPI application around one model and its engine.

Client mistakes come back as 4xx with an `ErrorResponse` naming the field; an unexpected
error in a handler is logged and answered 500 without stopping the server.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from moekit.model.transformer import Transformer
from moekit.serve import openai_compat, routes
from moekit.serve.config import EngineConfig
from moekit.serve.engine import Engine
from moekit.serve.inputs import ApiError
from moekit.serve.metrics import build_registry
from moekit.serve.schemas import ErrorResponse
from moekit.serve.state import ServerState

log = logging.getLogger(__name__)
ERRORS: dict[int | str, dict[str, Any]] = {
    422: {"model": ErrorResponse, "description": "Invalid request (the field is named)"},
    429: {"model": ErrorResponse, "description": "Queue full; retry after Retry-After seconds"},
}


def _error(status: int, message: str, kind: str, field: str | None, **extra: Any) -> JSONResponse:
    body: dict[str, Any] = {"error": {"message": message, "type": kind, "field": field}}
    body.update(extra)
    return JSONResponse(body, status_code=status)


def _field(loc: tuple | list) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or "body"


def _install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError) -> JSONResponse:
        resp = _error(err.status, err.message, err.kind, err.field)
        resp.headers.update(err.headers or {})
        return resp

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
        return _error(422, message, "invalid_request_error", field, detail=detail)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        resp = _error(err.status_code, str(err.detail), "http_error", None)
        resp.headers.update(err.headers or {})
        return resp

    @app.exception_handler(Exception)
    async def crash(_: Request, err: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _error(500, f"internal error: {type(err).__name__}", "server_error", None)


def create_app(
    model: Transformer, name: str = "moekit", engine: EngineConfig | None = None
) -> FastAPI:
    """A FastAPI app serving `model`; its engine starts and drains with the app's lifespan."""
    cfg = engine or EngineConfig()
    device = next(model.parameters()).device

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        eng = Engine(model, cfg)
        app.state.serve = ServerState(model, name, cfg, eng, device, build_registry(eng))
        eng.start()
        try:
            yield
        finally:
            await eng.stop()  # in-flight requests finish first

    app = FastAPI(
        title="moekit inference server",
        summary=f"Serving {name}: generation, OpenAI-compatible completions, routing inspection",
        version="1",
        lifespan=lifespan,
        responses=ERRORS,
    )
    _install_handlers(app)
    app.include_router(routes.router)
    app.include_router(openai_compat.router)
    return app


def default_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
