"""Inference server: dynamic batching engine, KV and prefix caches, FastAPI app."""

from moekit.serve.config import EngineConfig
from moekit.serve.engine import Engine


def run_server(ckpt: str, host: str = "127.0.0.1", port: int = 8080, device: str = "auto", **kw):
    """Serve a checkpoint over HTTP (see `moekit.serve.server.run_server`)."""
    from moekit.serve.server import run_server as _run

    _run(ckpt, host=host, port=port, device=device, **kw)


__all__ = ["Engine", "EngineConfig", "run_server"]
