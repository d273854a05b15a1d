"""`ServerState`: what the endpoints share (model, engine, metrics registry), one per app."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from prometheus_client import CollectorRegistry

from moekit.model.codec import ByteCodec, Codec
from moekit.model.transformer import Transformer
from moekit.serve.config import EngineConfig
from moekit.serve.engine import Engine


@dataclass
class ServerState:
    model: Transformer
    name: str
    cfg: EngineConfig
    engine: Engine
    device: torch.device
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    codec: Codec | None = None  # text in and out; None: token ids or vectors only
    started: float = field(default_factory=time.time)  # wall clock, for /v1/models

    @property
    def byte_level(self) -> bool:
        return isinstance(self.codec, ByteCodec)

    def model_info(self) -> dict[str, Any]:
        m = self.model
        layers = []
        for i in m.moe_layers():
            moe = m.blocks[i].ffn.cfg
            layers.append(
                {
                    "layer": i,
                    "n_experts": moe.n_experts,
                    "k": moe.k,
                    "n_shared_experts": moe.n_shared_experts,
                    "router": moe.router.kind,
                }
            )
        return {
            "name": self.name,
            "kind": "tokens" if m.is_lm else "continuous",
            "byte_level": self.byte_level,
            "tokenizer": self.codec is not None and not self.byte_level,
            "dtype": str(next(m.parameters()).dtype).removeprefix("torch."),
            "config": m.cfg.to_dict(),
            "params": m.num_params(),
            "moe_layers": layers,
            "device": str(self.device),
            "engine": {
                **self.cfg.to_dict(),
                "batch_invariant": self.engine.batch_invariant,
                "effective_max_batch": self.engine.runner.kv.n_rows,
                "prefix_cache": self.engine.prefix_cache,
                "decode": self.engine.decode_info(),
                "kv": self.engine.runner.kv.usage(),
            },
        }

    def stats(self) -> dict[str, Any]:
        e, s = self.engine, self.engine.stats
        uptime = time.monotonic() - s.started
        pool = e.runner.kv.pool
        pc = pool.stats if e.prefix_cache else None
        return {
            "uptime_s": uptime,
            "requests": {
                "accepted": s.requests,
                "rejected": s.rejected,
                "finished": dict(s.finished),
                "active": e.active,
                "queued": e.queue_depth,
            },
            "queue_depth": e.queue_depth,
            "tokens": {"prompt": s.prompt_tokens, "generated": s.generated_tokens},
            "tokens_per_s": s.tokens_per_s(),
            "tokens_per_s_since_start": s.generated_tokens / max(uptime, 1e-9),
            "batch": {
                "steps": s.steps,
                "mean_size": s.batched_sequences / s.steps if s.steps else 0.0,
                "occupancy": s.occupancy(),
                "prefill_tokens": s.prefill_tokens,
            },
            "kv": e.runner.kv.usage(),
            "latency_s": s.latency.summary(),
            "ttft_s": s.ttft.summary(),
            "inter_token_s": s.itl.summary(),
            "prefix_cache": None
            if pc is None
            else {
                "lookups": pc.lookups,
                "hits": pc.hits,
                "hit_rate": pc.hits / pc.lookups if pc.lookups else 0.0,
                "tokens_reused": pc.tokens_reused,
                "token_hit_rate": pc.tokens_reused / pc.tokens_looked_up
                if pc.tokens_looked_up
                else 0.0,
                "blocks": len(pool.index),
                "cached_tokens": len(pool.cached) * e.runner.kv.page,
                "capacity_tokens": pool.cache_pages * e.runner.kv.page,
                "evictions": pc.evictions,
            },
            "expert_load": s.expert_load(),
        }
