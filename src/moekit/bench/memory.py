"""`moekit bench memory`: KnowledgeStore bulk fill, reopen and exact top-k query latency.

Run: ``moekit bench memory --sizes [10000,100000]``. Writes
``<out_dir>/memory-<machine>-<date>.md``, ``.json`` and ``.png`` (query latency with its
spread, fill rate, reopen time and file size against the store size).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moekit.bench.charts import Chart, Panel, Series
from moekit.bench.registry import bench_command, option, register_bench
from moekit.bench.report import DEFAULT_DIR, Table, write_report
from moekit.memory import KnowledgeStore
from moekit.progress import progress

_FILL_CHUNK = 50_000


@dataclass
class MemoryBench:
    """KnowledgeStore query latency (and fill, reopen) at growing store sizes."""

    sizes: list[int] = option([10_000, 100_000, 1_000_000], "store sizes in nodes")
    dim: int = option(512, "embedding dimension")
    queries: int = option(100, "single queries timed per size")
    top_k: int = option(10, "hits per query")
    out_dir: str = option(DEFAULT_DIR, "directory of the .md and .json ('' writes none)")

    def __post_init__(self) -> None:
        if not self.sizes or min(self.sizes) < 1:
            raise ValueError(f"sizes={self.sizes} must be a non-empty list of sizes >= 1")
        for name in ("dim", "queries", "top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")


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
        "query_min_ms": round(min(lat_ms), 3),
        "query_p95_ms": round(_percentile(lat_ms, 0.95), 3),
        "query_batched_ms_per_query": round(batched_ms, 3),
    }


@register_bench("memory", MemoryBench)
def bench_memory(
    sizes: Sequence[int] = (10_000, 100_000, 1_000_000),
    dim: int = 512,
    queries: int = 100,
    out_dir: str | Path | None = DEFAULT_DIR,
    top_k: int = 10,
    seed: int = 0,
) -> dict[str, Any]:
    """Time bulk fill, reopen and top-k queries for each store size; write .md and .json reports.

    Single-query latency includes usage tracking (one small write transaction per query), as in
    default use; ``query_batched_ms_per_query`` is ``query_many`` over all queries, untracked.
    """
    runs = []
    with (
        tempfile.TemporaryDirectory(prefix="moekit-bench-memory-") as tmp,
        progress("bench memory", len(sizes)) as advance,
    ):
        for n in sizes:
            runs.append(_bench_size(int(n), dim, queries, top_k, seed, Path(tmp)))
            for p in Path(tmp).glob("*"):
                p.unlink()
            advance(f"{n:,} nodes")
    options = {"sizes": list(sizes), "dim": dim, "queries": queries, "top_k": top_k}
    return write_report(
        "memory",
        "KnowledgeStore benchmark",
        bench_command("memory", **options),
        [_table(runs)],
        {"dim": dim, "queries": queries, "top_k": top_k, "runs": runs},
        config={**options, "seed": seed},
        text=[
            f"Random float32 embeddings, dim={dim}, 2 experts of 64 per node; {queries} single "
            f"queries, top_k={top_k}, exact search (torch)."
        ],
        notes=[
            "Fill uses `add_many(..., dedup=False)` in chunks of 50,000 rows (one transaction "
            "each). Single-query times include the hit-count update; batched times are "
            "`query_many` without tracking, divided by the number of queries."
        ],
        out_dir=out_dir,
        chart=_chart(runs, queries),
    )


def _chart(runs: list[dict], queries: int) -> Chart:
    """Each measure against the store size (log axis); latency with its min-p95 band."""
    n = [r["nodes"] for r in runs]

    def line(key: str, label: str) -> Series:
        return Series(label, n, [r[key] for r in runs])

    latency = Series(
        "single query (median)", n, [r["query_median_ms"] for r in runs],
        [r["query_min_ms"] for r in runs], [r["query_p95_ms"] for r in runs],
    )  # fmt: skip
    batched = line("query_batched_ms_per_query", "batched, per query")
    return Chart(
        "KnowledgeStore benchmark",
        [
            Panel("query latency", [latency, batched], "nodes", "ms", logx=True, logy=True,
                  note=f"{queries} queries; band: min to p95"),
            Panel("bulk fill", [line("fill_rows_per_s", "fill")], "nodes", "rows/s", logx=True),
            Panel("reopen", [line("open_s", "reopen")], "nodes", "s", logx=True),
            Panel("database file", [line("db_mib", "size")], "nodes", "MiB", logx=True),
        ],
    )  # fmt: skip


def _table(runs: list[dict]) -> Table:
    columns = ("nodes", "fill s", "rows/s", "DB MiB", "reopen s", "query median ms")
    table = Table((*columns, "query p95 ms", "batched ms/query"))
    for r in runs:
        table.rows.append(
            (f"{r['nodes']:,}", r["fill_s"], f"{r['fill_rows_per_s']:,}", r["db_mib"])
            + (r["open_s"], r["query_median_ms"], r["query_p95_ms"])
            + (r["query_batched_ms_per_query"],)
        )
    return table


if __name__ == "__main__":
    from moekit.cli import main

    raise SystemExit(main(["bench", "memory", *sys.argv[1:]]))
