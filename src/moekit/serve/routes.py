"""Native endpoints: health, model, generate (JSON or SSE), route, stats, metrics.

Generation goes through the app's `Service`; these handlers only translate the schemas.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

import torch
from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from moekit.serve.inputs import check_max_new, model_input
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
from moekit.serve.security import SecurityConfig, log_exchange
from moekit.serve.sequence import SamplingParams
from moekit.serve.service import Choice, Handle
from moekit.serve.sse import sse, sse_response
from moekit.serve.state import Security, ServerState, State

router = APIRouter()


@router.get("/health", summary="Liveness and readiness")
async def health(s: State) -> dict:
    return {"status": "draining" if s.engine.stopping else "ok", "model": s.name}


@router.get("/v1/model", summary="Config, parameter counts and experts per layer")
async def model_info(s: State) -> dict:
    return s.model_info()


@router.get("/v1/stats", summary="Requests, tokens/s, queue, cache hit rates, expert load")
async def stats(s: State) -> dict:
    return s.engine.report()


@router.get("/metrics", summary="Prometheus text exposition", response_class=Response)
async def metrics(s: State) -> Response:
    return Response(generate_latest(s.registry), media_type=CONTENT_TYPE_LATEST)


def _response(s: ServerState, choice: Choice, usage: Usage) -> GenerateResponse:
    lm, seq = s.model.is_lm, choice.seq
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
        text=choice.text,
        token_ids=list(seq.outputs) if lm else None,
        outputs=None if lm else [v.tolist() for v in seq.outputs],
        logprobs=logprobs,
        finish_reason=choice.reason(unfinished="cancelled"),
        usage=usage,
        prefix_cache_tokens=seq.prefix_hit,
        ttft_s=None if seq.t_first is None else seq.t_first - seq.t_submit,
        latency_s=(seq.t_done or seq.t_submit) - seq.t_submit,
    )


@router.post(
    "/v1/generate",
    summary="Continue a prompt (JSON, or Server-Sent Events with stream=true)",
    response_model=GenerateResponse,
)
async def generate(body: GenerateRequest, request: Request, s: State, security: Security):
    x = model_input(body, s.model, s.cfg, s.codec)
    check_max_new(body.max_new_tokens, "max_new_tokens", s.model, s.cfg)
    logprobs = body.logprobs if s.model.is_lm else None
    params = SamplingParams.from_request(body, body.max_new_tokens, logprobs)
    handle = s.service.submit(
        [x],
        params,
        request_id=body.request_id,
        use_cache=body.use_cache,
        disconnected=request.is_disconnected,
    )
    if body.stream:
        return sse_response(_stream(s, handle, body, security))
    (choice,) = await handle.result()
    return _logged(security, body, _response(s, choice, handle.usage()))


def _logged(
    security: SecurityConfig, body: GenerateRequest, resp: GenerateResponse
) -> GenerateResponse:
    """The answer, after logging its text when the server was started with --log-prompts."""
    prompt = next(p for p in (body.prompt, body.token_ids, body.inputs) if p is not None)
    completion = next(c for c in (resp.text, resp.token_ids, resp.outputs) if c is not None)
    log_exchange(security, resp.id, prompt, completion)
    return resp


async def _stream(
    s: ServerState, handle: Handle, body: GenerateRequest, security: SecurityConfig
) -> AsyncIterator[str]:
    """One event per new position, then 'done' with the whole answer."""
    index = 0
    async with aclosing(handle.stream()) as deltas:
        async for d in deltas:
            if d.finish_reason is not None:  # the end: its held-back text is in the answer
                continue
            if s.model.is_lm:
                data = {"index": index, "token_id": d.token, "text": d.text}
                if d.logprobs is not None:
                    data |= {"logprob": d.logprobs.logprob, "top": d.logprobs.top}
            else:
                data = {"index": index, "output": d.token.tolist()}
            yield sse(data)
            index += 1
    (choice,) = handle.choices
    done = _logged(security, body, _response(s, choice, handle.usage()))
    yield sse(done.model_dump(), event="done")


@router.post(
    "/v1/route",
    summary="Experts and gate weights chosen for each input position, per MoE layer",
    response_model=RouteResponse,
)
async def route(body: RouteRequest, s: State) -> RouteResponse:
    x = model_input(body, s.model, s.cfg, s.codec)  # at most the context (<= max_seq_len)

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
