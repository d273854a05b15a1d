"""Serving load test: the real server in a subprocess, driven by concurrent streaming clients.

For each concurrency c, `requests` greedy generations run with c in flight at once; we report
req/s, generated tokens/s, latency and time-to-first-token percentiles, the tokens/s speedup
over c = 1, and a prefix-cache comparison (long shared prompt: cold vs warm TTFT). Writes
docs/benchmarks/serving-<machine>-<date>.md and .json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from moekit.bench.memory import machine_description

TEXT = (
    "def forward(self, x):\n    h = self.norm(x)\n    return x + self.mlp(h)\n"
    "class Router(nn.Module):\n    def __init__(self, d, n):\n        super().__init__()\n"
)


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


def run(
    ckpt: str,
    concurrency: tuple[int, ...] = (1, 8, 32),
    requests: int = 64,
    out_dir: str | Path = "docs/benchmarks",
    max_new_tokens: int = 64,
    prefix_len: int = 384,
    threads: int = 1,
    random_init: bool = False,
) -> dict[str, Any]:
    """Run the load test against `ckpt` and write the report files; returns the report.

    random_init only labels the report (the checkpoint holds untrained weights).
    """
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
    machine = machine_description()
    date = dt.date.today().isoformat()
    report = {
        "date": date,
        "machine": machine,
        "torch": torch.__version__,
        "threads": threads,
        "checkpoint": str(ckpt),
        "random_init": random_init,
        "model": {"params": info["params"], "config": info["config"]},
        "max_new_tokens": max_new_tokens,
        "rows": rows,
        "prefix_cache": prefix,
        "command": " ".join(["python -m moekit.bench.serve", *sys.argv[1:]]),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", str(machine["cpu"]).lower()).strip("-")
    stem = out / f"serving-{slug}-{machine['cores']}c-{date}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(_markdown(report))
    report["files"] = [str(stem.with_suffix(".md")), str(stem.with_suffix(".json"))]
    return report


def _markdown(r: dict[str, Any]) -> str:
    m, p, cfg = r["machine"], r["prefix_cache"], r["model"]["config"]
    weights = "random init (written by --random-init)" if r.get("random_init") else "as saved"
    lines = [
        f"# Serving benchmark, {r['date']}",
        "",
        f"Command: `{r['command']}`  ",
        f"Machine: {m['cpu']}, {m['cores']} cores; torch {r['torch']}, {r['threads']} thread(s).  ",
        f"Model: `{r['checkpoint']}`, d_model {cfg['d_model']}, {cfg['n_layers']} layers, "
        f"{cfg['moe']['n_experts']} experts top-{cfg['moe']['k']}, "
        f"{r['model']['params']['total']:,} params ({r['model']['params']['active']:,} active).  ",
        f"Weights: {weights}. Each request: greedy, streaming, {r['max_new_tokens']} new tokens.",
        "",
        "| concurrency | requests | req/s | tokens/s | speedup | latency p50/p95/p99 (s) "
        "| TTFT p50/p95/p99 (s) | 5xx |",
        "|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    for row in r["rows"]:
        lat = "/".join(f"{row['latency_s'][k]:.3f}" for k in ("p50", "p95", "p99"))
        ttft = "/".join(f"{row['ttft_s'][k]:.3f}" for k in ("p50", "p95", "p99"))
        lines.append(
            f"| {row['concurrency']} | {row['requests']} | {row['req_per_s']:.2f} | "
            f"{row['tokens_per_s']:.1f} | {row['speedup_vs_first']:.2f}x | {lat} | {ttft} | "
            f"{row['errors_5xx']} |"
        )
    lines += [
        "",
        f"Prefix cache, {p['prompt_bytes']}-byte prompt, median TTFT of 8 requests: "
        f"cold {p['cold_ttft_s'] * 1e3:.1f} ms, warm {p['warm_ttft_s'] * 1e3:.1f} ms "
        f"({p['speedup']:.2f}x); 5xx: {p['errors_5xx']}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m moekit.bench.serve", description=__doc__)
    p.add_argument("ckpt", help="checkpoint directory")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated levels")
    p.add_argument("--requests", type=int, default=64, help="requests per level")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="server torch threads")
    p.add_argument("--out-dir", default="docs/benchmarks")
    p.add_argument("--random-init", action="store_true", help="first write a random model there")
    a = p.parse_args(argv)
    if a.random_init and not (Path(a.ckpt) / "config.json").exists():
        random_checkpoint(a.ckpt)
    levels = tuple(int(c) for c in a.concurrency.split(","))
    report = run(
        a.ckpt,
        levels,
        a.requests,
        a.out_dir,
        a.max_new_tokens,
        threads=a.threads,
        random_init=a.random_init,
    )
    print(Path(report["files"][0]).read_text())


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
