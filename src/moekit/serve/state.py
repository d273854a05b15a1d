"""`ServerState`: what the endpoints share (model, engine, service, metrics), one per app.

Endpoints reach it, and the app's `SecurityConfig`, through FastAPI dependencies (`State`,
`Security`), so a handler's signature says what it uses.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Annotated, Any

import torch
from fastapi import Depends, Request
from prometheus_client import CollectorRegistry

from moekit.model.codec import ByteCodec, Codec
from moekit.model.transformer import Transformer
from moekit.serve.config import EngineConfig
from moekit.serve.engine import Engine
from moekit.serve.security import SecurityConfig
from moekit.serve.service import Service


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
    served_name: str | None = None  # given by the operator: the `model` of every answer
    service: Service = field(init=False)  # every generation endpoint submits here

    def __post_init__(self) -> None:
        self.service = Service(self.engine, self.codec)

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
            "context_length": self.engine.context_length,
            "engine": self.engine.info(),
        }


def _state(request: Request) -> ServerState:
    return request.app.state.serve


def _security(request: Request) -> SecurityConfig:
    return request.app.state.security


State = Annotated[ServerState, Depends(_state)]
Security = Annotated[SecurityConfig, Depends(_security)]
