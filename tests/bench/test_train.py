"""`moekit bench train` on a CPU at tiny size: the harness, the FLOP count and the HF peer."""

import importlib.util
import json
from pathlib import Path

import pytest

from moekit.bench.registry import bench_spec
from moekit.bench.train import TrainBench, ratios, run
from moekit.bench.train_models import SHAPES, flops_per_token, hf_model, moekit_model

TINY = dict(device="cpu", shapes=["tiny"], batch_size=2, seq_len=16, steps=2, warmup=1)


def test_harness_times_every_mode_and_writes_the_report(tmp_path):
    report = run(
        **TINY,
        contenders=["moekit:torch", "moekit:nope"],
        checkpointing=["none", "blocks"],
        compile=False,
        out_dir=str(tmp_path),
    )
    rows = report["rows"]
    assert [(r["contender"], r["checkpointing"]) for r in rows] == [
        ("moekit:torch", "none"),
        ("moekit:nope", "none"),
        ("moekit:torch", "blocks"),
        ("moekit:nope", "blocks"),
    ]
    for r in rows[::2]:
        assert r["step_s"] > 0 and r["tokens_per_s"] == pytest.approx(32 / r["step_s"])
        assert r["mfu"] > 0 and r["peak_gib"] is None  # no CUDA allocator to ask
    assert "backend" in rows[1]["error"]  # a failing contender is a row, not a crash
    md, js = (Path(p) for p in report["files"])
    assert md.name.startswith("train-cpu-")
    assert "| tiny (2L) | moekit:torch | blocks | no | 2 x 16 |" in md.read_text()
    data = json.loads(js.read_text())
    assert data["peak"]["tflops"] > 0 and data["config"]["shapes"] == ["tiny"]
    assert data["command"].startswith("moekit bench train --device cpu --shapes [tiny]")


def test_flops_per_token_counts_k_of_e_experts_and_attention():
    cfg = SHAPES["tiny"].model_config(2, 16, "torch")
    D, E, k, H, V, q, kv = 64, 8, 2, 32, 256, 64, 32
    weights = 2 * (D * (q + 2 * kv) + q * D + D * E + k * 3 * D * H) + D * V
    assert flops_per_token(cfg, 16) == 6 * weights + 12 * 2 * q * 16


def test_ratios_compare_the_lead_at_the_same_shape_and_mode():
    rows = [
        {"shape": "s", "checkpointing": "none", "contender": "moekit:triton", "mfu": 0.4},
        {"shape": "s", "checkpointing": "none", "contender": "hf:grouped_mm", "mfu": 0.2},
        {"shape": "s", "checkpointing": "blocks", "contender": "hf:grouped_mm", "mfu": 0.1},
    ]
    assert ratios(rows) == ["s, checkpointing none: MFU of moekit:triton is 2.00x hf:grouped_mm's"]


@pytest.mark.parametrize(
    "kw, field",
    [({"contenders": ["vllm"]}, "contenders"), ({"shapes": ["gpt4"]}, "shapes"),
     ({"checkpointing": ["all"]}, "checkpointing"), ({"steps": 0}, "steps"),
     ({"device": "tpu"}, "device")],
)  # fmt: skip
def test_bad_options_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        TrainBench(**kw)


def test_registered_as_moekit_bench_train():
    assert bench_spec("train").config is TrainBench


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
def test_hf_peer_has_the_same_parameters_and_trains(tmp_path):
    import torch

    cfg = SHAPES["tiny"].model_config(2, 16, "torch")
    ours, theirs = (
        moekit_model(cfg, torch.device("cpu")),
        hf_model(cfg, "qwen3_moe", "eager", "cpu"),
    )
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    assert {p.dtype for p in theirs.parameters()} == {torch.float32}
    report = run(**TINY, contenders=["hf:eager"], compile=False, out_dir="")
    assert report["rows"][0]["step_s"] > 0, report["rows"][0].get("error")
