import json

from rich.console import Console

from moekit.bench.layer import Shape, run


def test_bench_writes_markdown_and_json(tmp_path):
    shapes = (Shape("tiny", 4, 2, 16, 8, 64),)
    rows = run(
        repeats=2,
        out_dir=str(tmp_path),
        shapes=shapes,
        console=Console(quiet=True),
    )
    names = {r["contender"] for r in rows}
    assert "moekit[torch]" in names and any(n.startswith("naive") for n in names)
    assert any(n.startswith("dense-eq") for n in names)
    md = next(tmp_path.glob("layer-cpu-*.md")).read_text()
    assert "| tiny | moekit[torch] |" in md
    data = json.loads(next(tmp_path.glob("layer-cpu-*.json")).read_text())
    assert data["meta"]["machine"] and all(r["fwd_ms"] > 0 for r in data["rows"])
    dense = [r for r in data["rows"] if r["contender"].startswith("dense")][0]
    assert dense["x_dense_fwd"] == 1.0
