"""Serving load test: the real server in a subprocess, driven by concurrent streaming clients.

For each concurrency c, `requests` greedy generations run with c in flight at once; we report
req/s, generated tokens/s, latency and time-to-first-token percentiles, the tokens/s speedup
over c = 1, and a prefix-cache comparison (long shared prompt: cold vs warm TTFT). Writes
docs/benchmarks/serving-<machine>-<date>.md and .json.

    moekit bench serve CKPT --concurrency [1,8,32] --requests 64
"""

from __future__ import annotations

import asyncio
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from moekit.bench.registry import argument, bench_command, option, register_bench
from moekit.bench.report import DEFAULT_DIR, Table, write_report

if TYPE_CHECKING:  # httpx comes with the `serve` extra: the functions that use it import it
    import httpx

TEXT = (
    "def forward(self, x):\n    h = self.norm(x)\n    return x + self.mlp(h)\n"
    "class Router(nn.Module):\n    def __init__(self, d, n):\n        super().__init__()\n"
)


@dataclass
class ServeBench:
    """Load-test `moekit serve` on a checkpoint: the real server, streaming clients."""

    ckpt: str = argument("checkpoint or run directory")
    concurrency: list[int] = option([1, 8, 32], "requests in flight, one row per level")
    requests: int = option(64, "requests per concurrency level")
    max_new_tokens: int = option(64, "greedy tokens generated per request")
    prefix_len: int = option(384, "bytes of the shared prompt of the prefix-cache comparison")
    threads: int = option(1, "server torch threads")
    random_init: bool = option(False, "first write a random-init model to CKPT if it has none")
    out_dir: str = option(DEFAULT_DIR, "directory of the .md and .json ('' writes none)")

    def __post_init__(self) -> None:
        if not self.concurrency or min(self.concurrency) < 1:
            raise ValueError(f"concurrency={self.concurrency} must be a non-empty list of >= 1")
        for name in ("requests", "max_new_tokens", "prefix_len", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")


def random_checkpoint(path: str | Path, seed: int = 0) -> Path:
    """A random-init byte-level MoE model (4 layers, d_model 256, 8 experts, top-2)."""
    from moekit.config import MoEConfig
    from moekit.model import ModelConfig, Transformer, save_model_files

    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=256,
        d_model=256,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        max_seq_len=512,
        moe=MoEConfig(d_model=256, d_hidden=512, n_experts=8, k=2),
    )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_model_files(Transformer(cfg), path)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(ckpt: str, options: list[str]) -> tuple[subprocess.Popen, str]:
    import httpx

    port = _free_port()
    cmd = [sys.executable, "-m", "moekit.serve", ckpt, "--port", str(port), "--device", "cpu"]
    proc = subprocess.Popen([*cmd, "--log-level", "warning", *options])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("server exited during start-up")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server not ready after 120 s")


async def _one(client: httpx.AsyncClient, prompt: str, max_new: int) -> dict[str, Any]:
    """One streaming greedy request: status, latency, time to first token, tokens."""
    body = {"prompt": prompt, "max_new_tokens": max_new, "stream": True}
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", "/v1/generate", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return {"status": r.status_code, "latency": time.perf_counter() - t0}
        async for line in r.aiter_lines():
            if line.startswith("data:") and '"token_id"' in line:
                tokens += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
    return {"status": 200, "latency": time.perf_counter() - t0, "ttft": ttft, "tokens": tokens}


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))] if s else float("nan")


async def _load(url: str, concurrency: int, n: int, max_new: int) -> dict[str, Any]:
    import httpx

    prompts = [f"{i:05d} {TEXT[i % 40 : i % 40 + 40]}" for i in range(n)]  # distinct starts
    queue: asyncio.Queue[str] = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    results: list[dict[str, Any]] = []
    limits = httpx.Limits(max_connections=concurrency + 4)

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                results.append(await _one(client, queue.get_nowait(), max_new))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if r["status"] == 200]
    lat, ttft = [r["latency"] for r in ok], [r["ttft"] for r in ok if r["ttft"] is not None]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "errors_5xx": sum(r["status"] >= 500 for r in results),
        "errors_4xx": sum(400 <= r["status"] < 500 for r in results),
        "wall_s": wall,
        "req_per_s": len(ok) / wall,
        "tokens_per_s": tokens / wall,
        "latency_s": {f"p{q}": _pct(lat, q / 100) for q in (50, 95, 99)},
        "ttft_s": {f"p{q}": _pct(ttft, q / 100) for q in (50, 95, 99)},
    }


async def _prefix(url: str, prompt_len: int, repeats: int) -> dict[str, Any]:
    """Median TTFT with a long prompt: cold (new prefix each time) vs warm (shared prefix)."""
    import httpx

    shared = (TEXT * (prompt_len // len(TEXT) + 1))[:prompt_len]
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        cold = [await _one(client, f"{i:04d}" + shared, 1) for i in range(repeats)]
        await _one(client, "warm" + shared, 1)  # fills the cache
        warm = [await _one(client, "warm" + shared + f"#{i}", 1) for i in range(repeats)]
        stats = (await client.get("/v1/stats")).json()["prefix_cache"]
    c = statistics.median(r["ttft"] for r in cold)
    w = statistics.median(r["ttft"] for r in warm)
    errors = sum(r["status"] >= 500 for r in cold + warm)
    return {
        "prompt_bytes": prompt_len + 4,
        "cold_ttft_s": c,
        "warm_ttft_s": w,
        "speedup": c / w,
        "errors_5xx": errors,
        "cache": stats,
    }


@register_bench("serve", ServeBench)
def run(
    ckpt: str,
    concurrency: Sequence[int] = (1, 8, 32),
    requests: int = 64,
    out_dir: str | Path | None = DEFAULT_DIR,
    max_new_tokens: int = 64,
    prefix_len: int = 384,
    threads: int = 1,
    random_init: bool = False,
) -> dict[str, Any]:
    """Run the load test against `ckpt` and write the report files; returns the report.

    random_init first writes a random-init model to `ckpt` unless one is there, and says so
    in the report.
    """
    import httpx

    if random_init and not (Path(ckpt) / "config.json").exists():
        random_checkpoint(ckpt)
    options = ["--max-batch", str(max(concurrency)), "--max-queue", str(4 * max(concurrency))]
    options += ["--threads", str(threads)]
    proc, url = _start(ckpt, options)
    try:
        info = httpx.get(url + "/v1/model").json()
        asyncio.run(_load(url, 2, 4, 8))  # warm-up
        rows = [asyncio.run(_load(url, c, requests, max_new_tokens)) for c in concurrency]
        prefix = asyncio.run(_prefix(url, prefix_len, repeats=8))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    base = rows[0]["tokens_per_s"]
    for row in rows:
        row["speedup_vs_first"] = row["tokens_per_s"] / base
    settings = {"ckpt": str(ckpt), "concurrency": list(concurrency), "requests": requests}
    settings |= {"max_new_tokens": max_new_tokens, "prefix_len": prefix_len, "threads": threads}
    settings["random_init"] = random_init
    model = {"params": info["params"], "config": info["config"]}
    return write_report(
        "serving",
        "Serving benchmark",
        bench_command("serve", **settings),
        [_table(rows)],
        {"model": model, "rows": rows, "prefix_cache": prefix},
        config=settings,
        text=[_model_line(model, ckpt, random_init, max_new_tokens, threads)],
        notes=[
            f"Prefix cache, {prefix['prompt_bytes']}-byte prompt, median TTFT of 8 requests: "
            f"cold {prefix['cold_ttft_s'] * 1e3:.1f} ms, warm {prefix['warm_ttft_s'] * 1e3:.1f} "
            f"ms ({prefix['speedup']:.2f}x); 5xx: {prefix['errors_5xx']}."
        ],
        out_dir=out_dir,
    )


def _model_line(
    model: dict[str, Any], ckpt: str, random_init: bool, max_new_tokens: int, threads: int
) -> str:
    cfg, params = model["config"], model["params"]
    weights = "random init (written by --random-init)" if random_init else "as saved"
    return (
        f"Model: `{ckpt}`, d_model {cfg['d_model']}, {cfg['n_layers']} layers, "
        f"{cfg['moe']['n_experts']} experts top-{cfg['moe']['k']}, {params['total']:,} params "
        f"({params['active']:,} active); weights {weights}. Server: {threads} torch thread(s). "
        f"Each request: greedy, streaming, {max_new_tokens} new tokens."
    )


def _table(rows: list[dict[str, Any]]) -> Table:
    columns = ("concurrency", "requests", "req/s", "tokens/s", "speedup")
    table = Table((*columns, "latency p50/p95/p99 (s)", "TTFT p50/p95/p99 (s)", "5xx"))
    for row in rows:
        lat = "/".join(f"{row['latency_s'][k]:.3f}" for k in ("p50", "p95", "p99"))
        ttft = "/".join(f"{row['ttft_s'][k]:.3f}" for k in ("p50", "p95", "p99"))
        table.rows.append(
            (row["concurrency"], row["requests"], f"{row['req_per_s']:.2f}")
            + (f"{row['tokens_per_s']:.1f}", f"{row['speedup_vs_first']:.2f}x", lat, ttft)
            + (row["errors_5xx"],)
        )
    return table


if __name__ == "__main__":
    from moekit.cli import main

    raise SystemExit(main(["bench", "serve", *sys.argv[1:]]))
