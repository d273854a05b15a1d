import json
from pathlib import Path

import moekit.bench.layer as bench_layer
from moekit.bench.layer import Shape, run
from moekit.viz import read_panels


def test_bench_writes_markdown_and_json(tmp_path, monkeypatch):
    # the Triton interpreter (CI's TRITON_INTERPRET=1) is slow: time the CPU backends only
    supported = bench_layer.unsupported_reason
    monkeypatch.setattr(
        bench_layer,
        "unsupported_reason",
        lambda name, device, dtype: (
            "interpreted" if name == "triton" else supported(name, device, dtype)
        ),
    )
    shape = Shape("tiny", 4, 2, 16, 8, 64)
    report = run(repeats=2, out_dir=str(tmp_path), shapes=(shape,), tokens=(32, 64))
    names = {r["contender"] for r in report["rows"]}
    assert "moekit[torch]" in names and any(n.startswith("naive") for n in names)
    assert any(n.startswith("dense-eq") for n in names)
    md, js = (Path(p) for p in report["files"])
    assert md.name.startswith("layer-cpu-") and md.parent == tmp_path
    assert "| tiny | moekit[torch] | 32 |" in md.read_text()
    data = json.loads(js.read_text())
    assert data["machine"]["cpu"] and all(r["fwd_ms"] > 0 for r in data["rows"])
    dense = [r for r in data["rows"] if r["contender"].startswith("dense")][0]
    assert dense["x_dense_fwd"] == 1.0
    assert data["command"] == "moekit bench layer --repeats 2 --shapes [tiny] --tokens [32,64]"
    assert [p.split(": ")[1] for p in read_panels(report["chart"]["file"])] == [
        "fwd+bwd time",
        "speed-up vs naive loop",
        "fwd+bwd at T=64",
        "activations saved at T=64",
    ]
    for row in data["rows"]:
        assert row["fwd_bwd_ms_min"] <= row["fwd_bwd_ms"] <= row["fwd_bwd_ms_max"]
        assert row["saved_mib"] > 0 and row["peak_mib"] is None  # peak: CUDA only
