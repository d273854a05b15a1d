import json
from pathlib import Path

from moekit.bench.layer import Shape, run


def test_bench_writes_markdown_and_json(tmp_path):
    report = run(repeats=2, out_dir=str(tmp_path), shapes=(Shape("tiny", 4, 2, 16, 8, 64),))
    names = {r["contender"] for r in report["rows"]}
    assert "moekit[torch]" in names and any(n.startswith("naive") for n in names)
    assert any(n.startswith("dense-eq") for n in names)
    md, js = (Path(p) for p in report["files"])
    assert md.name.startswith("layer-cpu-") and md.parent == tmp_path
    assert "| tiny | moekit[torch] |" in md.read_text()
    data = json.loads(js.read_text())
    assert data["machine"]["cpu"] and all(r["fwd_ms"] > 0 for r in data["rows"])
    dense = [r for r in data["rows"] if r["contender"].startswith("dense")][0]
    assert dense["x_dense_fwd"] == 1.0
    assert data["command"] == "moekit bench layer --repeats 2 --shapes [tiny]"
