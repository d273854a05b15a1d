"""Native endpoints: health, model, generate (JSON or SSE), route, stats, metrics."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

import torch
from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from moekit.model.codec import Decoder
from moekit.serve.inputs import ApiError, check_max_new, model_input
from moekit.serve.schemas import (
    GenerateRequest,
    GenerateResponse,
    LayerRouting,
    RouteRequest,
    RouteResponse,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from moekit.serve.security import log_exchange
from moekit.serve.sequence import SamplingParams, Sequence
from moekit.serve.state import ServerState
from moekit.serve.stream import SSE_HEADERS, follow, sse, submit

router = APIRouter()


def state(request: Request) -> ServerState:
    return request.app.state.serve


@router.get("/health", summary="Liveness and readiness")
async def health(request: Request) -> dict:
    s = state(request)
    return {"status": "draining" if s.engine.stopping else "ok", "model": s.name}


@router.get("/v1/model", summary="Config, parameter counts and experts per layer")
async def model_info(request: Request) -> dict:
    return state(request).model_info()


@router.get("/v1/stats", summary="Requests, tokens/s, queue, cache hit rates, expert load")
async def stats(request: Request) -> dict:
    return state(request).stats()


@router.get("/metrics", summary="Prometheus text exposition", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(generate_latest(state(request).registry), media_type=CONTENT_TYPE_LATEST)


def _response(s: ServerState, seq: Sequence, text: str | None) -> GenerateResponse:
    lm = s.model.is_lm
    n = len(seq.outputs)
    logprobs = None
    if seq.params.logprobs is not None:
        logprobs = [
            TokenLogprob(
                token_id=t,
                logprob=lp.logprob,
                top=[TopLogprob(token_id=i, logprob=v) for i, v in lp.top],
            )
            for t, lp in zip(seq.outputs, seq.logprobs_out, strict=True)
        ]
    return GenerateResponse(
        id=seq.id,
        text=text,
        token_ids=list(seq.outputs) if lm else None,
        outputs=None if lm else [v.tolist() for v in seq.outputs],
        logprobs=logprobs,
        finish_reason=seq.finish_reason or "cancelled",
        usage=Usage(
            prompt_tokens=len(seq.prompt), completion_tokens=n, total_tokens=len(seq.prompt) + n
        ),
        prefix_cache_tokens=seq.prefix_hit,
        ttft_s=None if seq.t_first is None else seq.t_first - seq.t_submit,
        latency_s=(seq.t_done or seq.t_submit) - seq.t_submit,
    )


@router.post(
    "/v1/generate",
    summary="Continue a prompt (JSON, or Server-Sent Events with stream=true)",
    response_model=GenerateResponse,
)
async def generate(body: GenerateRequest, request: Request):
    s = state(request)
    x = model_input(body, s.model, s.cfg, s.codec)
    check_max_new(body.max_new_tokens, "max_new_tokens", s.model, s.cfg)
    stop_ids = s.codec.eos_ids if s.codec is not None else ()
    params = SamplingParams(
        body.max_new_tokens,
        body.temperature,
        body.top_k,
        body.top_p,
        body.seed,
        body.logprobs if s.model.is_lm else None,
        stop_ids,
    )
    seq = submit(s.engine, x, params, body.request_id, body.use_cache)
    decoder = s.codec.decoder() if s.codec is not None else None
    if body.stream:
        return StreamingResponse(
            _stream(s, seq, request, decoder, body),
            media_type="text/event-stream",
            headers=SSE_HEADERS,
        )
    text = ""
    async with aclosing(follow(s.engine, seq, request)) as events:
        async for event in events:
            if event.kind == "token" and decoder is not None:
                text += decoder.feed(event.value)
    return _logged(request, body, _response(s, seq, text + decoder.flush() if decoder else None))


def _logged(request: Request, body: GenerateRequest, resp: GenerateResponse) -> GenerateResponse:
    """The answer, after logging its text when the server was started with --log-prompts."""
    prompt = next(p for p in (body.prompt, body.token_ids, body.inputs) if p is not None)
    completion = next(c for c in (resp.text, resp.token_ids, resp.outputs) if c is not None)
    log_exchange(request.app.state.security, resp.id, prompt, completion)
    return resp


async def _stream(
    s: ServerState,
    seq: Sequence,
    request: Request,
    decoder: Decoder | None,
    body: GenerateRequest,
) -> AsyncIterator[str]:
    text, index = "", 0
    async with aclosing(follow(s.engine, seq, request)) as events:
        async for event in events:
            if event.kind == "done":
                break
            if s.model.is_lm:
                piece = decoder.feed(event.value) if decoder else None
                text += piece or ""
                data = {"index": index, "token_id": event.value, "text": piece}
                if event.logprobs is not None:
                    data |= {"logprob": event.logprobs.logprob, "top": event.logprobs.top}
                yield sse(data)
            else:
                yield sse({"index": index, "output": event.value.tolist()})
            index += 1
    tail = decoder.flush() if decoder else ""
    done = _logged(request, body, _response(s, seq, text + tail if decoder else None))
    yield sse(done.model_dump(), event="done")


@router.post(
    "/v1/route",
    summary="Experts and gate weights chosen for each input position, per MoE layer",
    response_model=RouteResponse,
)
async def route(body: RouteRequest, request: Request) -> RouteResponse:
    s = state(request)
    x = model_input(body, s.model, s.cfg, s.codec)
    if len(x) > s.model.cfg.max_seq_len:
        field = "inputs" if not s.model.is_lm else ("prompt" if body.prompt else "token_ids")
        msg = f"{field}: {len(x)} positions exceed max_seq_len={s.model.cfg.max_seq_len}"
        raise ApiError(422, msg, field)

    def run() -> list:
        with torch.no_grad():
            return s.model(x[None].to(s.device)).layers

    infos = await s.engine.run_exclusive(run)
    layers = []
    for i, info in enumerate(infos):
        if info is None:
            continue
        moe = s.model.blocks[i].ffn.cfg
        layers.append(
            LayerRouting(
                layer=i,
                n_experts=moe.n_experts,
                k=moe.k,
                experts=info.routing.experts.reshape(len(x), -1).tolist(),
                weights=info.routing.weights.float().reshape(len(x), -1).tolist(),
            )
        )
    tokens = None
    if s.codec is not None:
        tokens = [s.codec.token_text(t) for t in x.tolist()]
    return RouteResponse(positions=len(x), tokens=tokens, layers=layers)
