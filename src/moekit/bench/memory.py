"""Benchmark of KnowledgeStore: bulk fill, reopen and exact top-k query latency.

Run: ``python -m moekit.bench.memory --sizes 10000 100000``. Writes
``<out_dir>/memory-<machine>-<date>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from moekit.memory import KnowledgeStore

_FILL_CHUNK = 50_000


def machine_description() -> dict[str, Any]:
    """CPU model, logical core count and platform of this machine."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": model,
        "cores": cores,
        "machine": platform.machine(),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def _slug(machine: dict[str, Any]) -> str:
    name = re.sub(r"[^a-z0-9]+", "-", str(machine["cpu"]).lower()).strip("-")
    return f"{name or 'cpu'}-{machine['cores']}c"


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _bench_size(n: int, dim: int, queries: int, top_k: int, seed: int, workdir: Path) -> dict:
    """Fill a fresh store with n random insights, then time reopening and single queries."""
    gen = torch.Generator().manual_seed(seed)
    path = workdir / f"kb-{n}.sqlite"
    t0 = time.perf_counter()
    with KnowledgeStore(path, dim, index="torch") as store:
        for start in range(0, n, _FILL_CHUNK):
            m = min(_FILL_CHUNK, n - start)
            x_MD = torch.randn(m, dim, generator=gen)  # [M, D]
            experts_M2 = torch.randint(0, 64, (m, 2), generator=gen)  # [M, 2]
            layers = torch.randint(0, 8, (m,), generator=gen)
            store.add_many(x_MD, experts_M2, layers=layers, steps=start, dedup=False)
    fill_s = time.perf_counter() - t0
    db_bytes = sum(p.stat().st_size for p in workdir.glob(f"kb-{n}.sqlite*"))

    t0 = time.perf_counter()
    store = KnowledgeStore(path, dim, index="torch")
    open_s = time.perf_counter() - t0
    try:
        q_QD = torch.randn(queries, dim, generator=gen)  # [Q, D]
        for q in q_QD[:3]:  # warm-up
            store.query(q, top_k=top_k)
        lat_ms = []
        for q in q_QD:
            t0 = time.perf_counter()
            hits = store.query(q, top_k=top_k)
            lat_ms.append((time.perf_counter() - t0) * 1e3)
            assert len(hits) == min(top_k, n)
        t0 = time.perf_counter()
        store.query_many(q_QD, top_k=top_k, track=False)
        batched_ms = (time.perf_counter() - t0) * 1e3 / queries
    finally:
        store.close()
    return {
        "nodes": n,
        "fill_s": round(fill_s, 2),
        "fill_rows_per_s": round(n / fill_s),
        "db_mib": round(db_bytes / 2**20, 1),
        "open_s": round(open_s, 2),
        "query_median_ms": round(statistics.median(lat_ms), 3),
        "query_p95_ms": round(_percentile(lat_ms, 0.95), 3),
        "query_batched_ms_per_query": round(batched_ms, 3),
    }


def bench_memory(
    sizes: Sequence[int] = (10_000, 100_000, 1_000_000),
    dim: int = 512,
    queries: int = 100,
    out_dir: str | Path = "docs/benchmarks",
    top_k: int = 10,
    seed: int = 0,
) -> dict:
    """Time bulk fill, reopen and top-k queries for each store size; write .md and .json reports.

    Single-query latency includes usage tracking (one small write transaction per query), as in
    default use; ``query_batched_ms_per_query`` is ``query_many`` over all queries, untracked.
    """
    machine = machine_description()
    date = dt.date.today().isoformat()
    runs = []
    with tempfile.TemporaryDirectory(prefix="moekit-bench-memory-") as tmp:
        for n in sizes:
            runs.append(_bench_size(int(n), dim, queries, top_k, seed, Path(tmp)))
            for p in Path(tmp).glob("*"):
                p.unlink()
    report = {
        "date": date,
        "machine": machine,
        "dim": dim,
        "queries": queries,
        "top_k": top_k,
        "runs": runs,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"memory-{_slug(machine)}-{date}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(_markdown(report))
    report["files"] = [str(stem.with_suffix(".md")), str(stem.with_suffix(".json"))]
    return report


def _markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"# KnowledgeStore benchmark, {report['date']}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['machine']}, {m['system']}), "
        f"Python {m['python']}, torch {m['torch']} ({m['torch_threads']} threads).",
        f"Random float32 embeddings, dim={report['dim']}, 2 experts of 64 per node; "
        f"{report['queries']} single queries, top_k={report['top_k']}, exact search (torch).",
        "",
        "| nodes | fill s | rows/s | DB MiB | reopen s | query median ms | query p95 ms "
        "| batched ms/query |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["runs"]:
        lines.append(
            f"| {r['nodes']:,} | {r['fill_s']} | {r['fill_rows_per_s']:,} | {r['db_mib']} "
            f"| {r['open_s']} | {r['query_median_ms']} | {r['query_p95_ms']} "
            f"| {r['query_batched_ms_per_query']} |"
        )
    lines += [
        "",
        "Fill uses `add_many(..., dedup=False)` in chunks of 50,000 rows (one transaction each).",
        "Single-query times include the hit-count update; batched times are `query_many` "
        "without tracking, divided by the number of queries.",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--out-dir", default="docs/benchmarks")
    args = parser.parse_args(argv)
    report = bench_memory(args.sizes, args.dim, args.queries, args.out_dir)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
