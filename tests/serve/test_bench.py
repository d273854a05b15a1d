"""The serving load test runs end to end and writes its report files."""

import json
from pathlib import Path

from moekit.bench.serve import run


def test_bench_serve_writes_reports(byte_ckpt, tmp_path):
    report = run(
        str(byte_ckpt), (1, 4), requests=4, out_dir=tmp_path, max_new_tokens=8, prefix_len=40
    )
    md, js = report["files"]
    data = json.loads(Path(js).read_text())
    assert [row["concurrency"] for row in data["rows"]] == [1, 4]
    assert all(row["requests"] == 4 and row["errors_5xx"] == 0 for row in data["rows"])
    assert data["rows"][0]["speedup_vs_first"] == 1.0
    assert data["prefix_cache"]["cache"]["hits"] >= 8  # every warm request hit
    assert "| 4 | 4 |" in Path(md).read_text()
