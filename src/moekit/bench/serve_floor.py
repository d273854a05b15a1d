"""The floor of the c = 1 inter-token latency: what one decode step costs, from its parts.

floor = n_layers x (MoE layer at T = 1 + attention at T = 1 over `context` positions)
        + embedding, final norm, head and greedy sampling,
each part timed as the mean of back-to-back CUDA-graph replays. The engine's own B = 1
decode step (a replay of the graph it serves with, whose attention spans the whole window)
is timed too; the served inter-token latency minus it is what serving adds.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moekit.model.transformer import Transformer
from moekit.replay import capture
from moekit.serve.graphs import DecodeStep
from moekit.serve.paged import PagedKVCache, RowsView

PAGE = 16


def graph_ms(fn: Callable[[], object], repeats: int = 200) -> float:
    """Mean milliseconds of one replay of fn captured in a CUDA graph."""
    graph, _ = capture(fn, torch.device("cuda", torch.cuda.current_device()), warmup=2)
    return replay_ms(graph, repeats)


def replay_ms(graph: torch.cuda.CUDAGraph, repeats: int = 200) -> float:
    """Mean milliseconds of back-to-back replays of a captured graph."""
    for _ in range(10):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def _filled_cache(model: Transformer, context: int) -> PagedKVCache:
    """A one-row paged cache whose row holds `context` positions (values stay zero)."""
    kv = PagedKVCache(model, 1, model.cfg.max_seq_len // PAGE + 2, PAGE, 0)
    kv.extend([0], [context + 1])
    kv.commit([0], [context])
    kv.lengths[0] = context
    return kv


@torch.no_grad()
def measure_floor(model: Transformer, context: int) -> dict[str, float]:
    """Per-part graph times (ms) of one decode position at B = 1 and the floor they add to."""
    cfg, dev = model.cfg, next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    block = next(b for b in model.blocks if b.is_moe)
    x = torch.randn(1, 1, cfg.d_model, device=dev, dtype=dtype)
    kv = _filled_cache(model, context)
    rows = torch.zeros(1, dtype=torch.long, device=dev)
    one = torch.ones(1, dtype=torch.long, device=dev)
    pages = kv.pages_for(context + 1)

    def attention() -> object:  # layer 0 of n: the cache's lengths never move
        view = RowsView(kv, rows, one, pages)
        return block.attn(block.norm1(x), view.positions(1, 1, dev), view, 0)

    token = torch.zeros(1, 1, dtype=torch.long, device=dev)
    moe_ms = graph_ms(lambda: block.ffn(block.norm2(x)))
    attn_ms = graph_ms(attention)
    ends_ms = graph_ms(lambda: model.head(model.norm(model.embed(token))).argmax(-1))
    floor = cfg.n_layers * (moe_ms + attn_ms) + ends_ms
    step = DecodeStep(
        model,
        _filled_cache(model, context),
        torch.zeros(2, 1, dtype=torch.long, device=dev),
        torch.zeros(len(model.moe_layers()), block.ffn.cfg.n_experts, dtype=torch.long, device=dev),
        1,
        "graphs",
    )
    step([0])  # the graph's row buffer now names row 0
    step_ms = replay_ms(step.graphs[1][0]) if step.graphs else float("nan")
    return {
        "context": context,
        "layers": cfg.n_layers,
        "moe_layer_ms": moe_ms,
        "attention_ms": attn_ms,
        "embed_head_sample_ms": ends_ms,
        "floor_ms": floor,
        "engine_step_ms": step_ms,
    }
