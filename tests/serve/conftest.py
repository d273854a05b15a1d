"""Tiny checkpoints and a real server process on a free loopback port."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

import moekit
from moekit.model import ModelConfig, Transformer, save_model_files


def byte_config(**kw) -> ModelConfig:
    """A byte-level MoE model; init_std 0.3 spreads the logits, so greedy picks are stable."""
    base = dict(
        vocab_size=256,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        max_seq_len=64,
        moe=moekit.MoEConfig(d_model=64, d_hidden=64, n_experts=4, k=2),
        init_std=0.3,
    )
    base.update(kw)
    return ModelConfig(**base)


def make_model(seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(byte_config(**kw)).eval()


def serve_all(model: Transformer, cfg, prompts, params) -> tuple[list[list], dict]:
    """Every prompt through one started engine: each request's tokens and the decode info."""
    import asyncio

    from moekit.serve.engine import Engine

    async def main():
        engine = Engine(model, cfg)
        engine.start()
        seqs = [engine.submit(p, params) for p in prompts]
        for seq in seqs:
            while (await seq.events.get()).kind != "done":
                pass
        await engine.stop()
        return [s.outputs for s in seqs], engine.decode_info()

    return asyncio.run(main())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m moekit.serve` in a subprocess; ready once /health answers.

    tls: the context that trusts the server's certificate (serves HTTPS; pass --ssl-* options);
    env: extra environment ($MOEKIT_API_KEY of the calling shell is never inherited).
    """

    def __init__(
        self,
        ckpt: Path,
        *options: str,
        tls: ssl.SSLContext | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.verify: ssl.SSLContext | bool = tls or True
        cmd = [sys.executable, "-m", "moekit.serve", str(ckpt), "--port", str(self.port)]
        cmd += ["--device", "cpu", "--threads", "1", "--log-level", "warning", *options]
        base = {k: v for k, v in os.environ.items() if k != "MOEKIT_API_KEY"}
        full_env = {**base, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(
            cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stdout.read().decode()}")  # type: ignore[union-attr]
            try:
                health = httpx.get(self.url + "/health", timeout=1, verify=self.verify)
                if health.status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("server did not become ready in 60 s")

    def sigterm(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.stdout.read().decode()  # type: ignore[union-attr]


@pytest.fixture(scope="session")
def byte_ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("byte_ckpt")
    save_model_files(make_model(), path)
    return path


@pytest.fixture(scope="session")
def server(byte_ckpt) -> Iterator[ServerProcess]:
    srv = ServerProcess(byte_ckpt, "--max-new-tokens", "256", "--prefix-cache-tokens", "4096")
    yield srv
    srv.stop()


@pytest.fixture
def client(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c
