"""`moekit bench hf` at a tiny size on the CPU: every implementation timed, report written."""

import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from moekit.bench.hf import HFBench, HFShape, run  # noqa: E402

TINY = HFShape(
    "tiny qwen3_moe",
    "qwen3_moe",
    dict(
        vocab_size=64,
        hidden_size=16,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        moe_intermediate_size=8,
        intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
    ),
)


def test_bench_times_every_implementation_and_writes_the_report(tmp_path):
    report = run(
        device="cpu",
        dtype="fp32",
        shapes=(TINY,),
        tokens=16,
        decode_batches=(1, 2),
        context=4,
        decode_steps=2,
        repeats=1,
        out_dir=str(tmp_path),
    )
    rows = report["rows"]
    assert [r["implementation"] for r in rows] == ["eager", "grouped_mm", "moekit"]
    columns = ("fwd_tok_s", "fwd_bwd_tok_s", "decode_b1_tok_s", "decode_b2_tok_s")
    assert all(r[c] > 0 for r in rows for c in columns)
    md, js = (Path(p) for p in report["files"])
    assert md.name.startswith("hf-cpu-") and "| tiny qwen3_moe | moekit |" in md.read_text()
    assert json.loads(js.read_text())["command"].startswith("moekit bench hf --device cpu")


def test_bench_config_names_a_bad_option():
    with pytest.raises(ValueError, match="implementations"):
        HFBench(implementations=["fast"])
    with pytest.raises(ValueError, match="shapes"):
        HFBench(shapes=["llama"])
