"""`run_server`: load a checkpoint and serve it with uvicorn until SIGINT / SIGTERM."""

from __future__ import annotations

import argparse
import logging
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
import uvicorn

from moekit.model.io import load
from moekit.serve.app import create_app, default_device
from moekit.serve.config import EngineConfig

DRAIN_TIMEOUT_S = 300  # SIGTERM: in-flight requests get this long to finish


def run_server(
    ckpt: str,
    host: str = "127.0.0.1",
    port: int = 8080,
    device: str = "auto",
    threads: int | None = None,
    log_level: str = "info",
    **engine_options: Any,
) -> None:
    """Serve a checkpoint (directory or run dir) over HTTP; OpenAPI docs at /docs.

    engine_options are `EngineConfig` fields (max_batch, max_queue, prefix_cache_tokens...).
    threads sets torch's CPU threads (1 is often fastest on a busy machine).
    """
    cfg = EngineConfig.from_options(engine_options)
    if threads is not None:
        torch.set_num_threads(threads)
    model = load(ckpt, default_device(device))
    app = create_app(model, name=Path(ckpt).resolve().name, engine=cfg)
    logging.basicConfig(level=log_level.upper())
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=DRAIN_TIMEOUT_S,
    )
    uvicorn.Server(config).run()  # SIGTERM: stop accepting, finish in-flight, then exit


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m moekit.serve", description=run_server.__doc__)
    p.add_argument("ckpt", help="checkpoint or run directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--log-level", default="info")
    defaults = EngineConfig()
    for f in fields(EngineConfig):
        value = getattr(defaults, f.name)
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(value), default=value)
    args = vars(p.parse_args(argv))
    run_server(**args)
