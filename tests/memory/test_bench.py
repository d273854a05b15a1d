"""bench_memory writes consistent .md/.json reports (tiny sizes)."""

from __future__ import annotations

import json
from pathlib import Path

from moekit.bench.memory import bench_memory


def test_bench_memory_writes_reports(tmp_path):
    report = bench_memory(sizes=(50, 300), dim=16, queries=5, out_dir=tmp_path)
    assert [r["nodes"] for r in report["runs"]] == [50, 300]
    for r in report["runs"]:
        assert 0 < r["query_median_ms"] <= r["query_p95_ms"]
        assert r["fill_s"] > 0 and r["db_mib"] > 0
    md, js = (Path(p) for p in report["files"])
    assert md.name.startswith("memory-") and md.suffix == ".md" and js.suffix == ".json"
    saved = json.loads(js.read_text())
    assert saved["runs"] == report["runs"] and saved["machine"]["cores"] >= 1
    assert "| 300 |" in md.read_text()
