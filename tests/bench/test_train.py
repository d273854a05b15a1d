"""`moekit bench train` on a CPU at tiny size: the harness, the FLOP count and the HF peer."""

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import pytest

import moekit.bench.train as bench_train
from moekit.bench.registry import bench_spec
from moekit.bench.train import TrainBench, compiled, largest_batch, plan_runs, ratios, run
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


def test_ratios_name_compiled_and_eager_leads():
    rows = [
        {"shape": "s", "checkpointing": "none", "contender": "moekit:triton", "mfu": 0.4,
         "compiled": True},
        {"shape": "s", "checkpointing": "none", "contender": "moekit:triton", "mfu": 0.3,
         "compiled": False},
        {"shape": "s", "checkpointing": "none", "contender": "hf:grouped_mm", "mfu": 0.2,
         "compiled": False},
    ]  # fmt: skip
    assert ratios(rows) == [
        "s, checkpointing none: MFU of moekit:triton (compiled) is 2.00x hf:grouped_mm's",
        "s, checkpointing none: MFU of moekit:triton is 1.50x hf:grouped_mm's",
    ]


def test_suffix_overrides_the_compile_switches():
    opts = TrainBench(contenders=["moekit:triton", "moekit:triton:eager", "hf:eager:compiled"])
    assert [compiled(c, opts) for c in opts.contenders] == [True, False, True]
    assert not compiled("hf:eager", opts) and compiled("hf:eager", TrainBench(hf_compile=True))


def test_plan_times_every_row_first_then_searches_batches():
    opts = TrainBench(
        contenders=["moekit:triton", "moekit:triton:eager", "hf:grouped_mm"],
        checkpointing=["none", "blocks"],
        checkpointing_contenders=["moekit:triton:eager"],
        max_batch=32,
        max_batch_contenders=["moekit:triton:eager"],
    )
    assert plan_runs(opts) == [
        ("time", "moekit:triton", "qwen3-30b-a3b", "none"),
        ("time", "moekit:triton:eager", "qwen3-30b-a3b", "none"),
        ("time", "hf:grouped_mm", "qwen3-30b-a3b", "none"),
        ("time", "moekit:triton:eager", "qwen3-30b-a3b", "blocks"),
        ("fit", "moekit:triton:eager", "qwen3-30b-a3b", "none"),
        ("fit", "moekit:triton:eager", "qwen3-30b-a3b", "blocks"),
    ]
    assert len(plan_runs(replace(opts, max_batch=0, checkpointing_contenders=[]))) == 6


def test_a_stopped_run_keeps_the_rows_it_finished(tmp_path, monkeypatch):
    timed = bench_train.bench_contender

    def stop_at_second(name, *args):
        if name == "moekit:nope":
            raise KeyboardInterrupt
        return timed(name, *args)

    monkeypatch.setattr(bench_train, "bench_contender", stop_at_second)
    with pytest.raises(KeyboardInterrupt):
        run(**TINY, contenders=["moekit:torch", "moekit:nope"], compile=False,
            out_dir=str(tmp_path))  # fmt: skip
    (md,) = tmp_path.glob("*.md")
    text = md.read_text()
    assert "| tiny (2L) | moekit:torch | none | no | 2 x 16 |" in text
    assert "Partial: 1 of 2 runs finished" in text and "moekit:nope" not in text.split("|")[-1]
    assert json.loads(md.with_suffix(".json").read_text())["rows"][0]["step_s"] > 0


def test_largest_batch_doubles_while_two_steps_fit():
    opts = TrainBench(**TINY, contenders=["moekit:torch"], compile=False, max_batch=5)
    fit = largest_batch("moekit:torch", "tiny", "blocks", opts)
    assert (fit["fits"], fit["limit"], fit["error"], fit["compiled"]) == (4, 5, "", False)
    assert fit["step_s"] > 0
    wrong = largest_batch("moekit:nope", "tiny", "none", replace(opts, contenders=["moekit:nope"]))
    assert wrong["fits"] == 0 and "backend" in wrong["error"]


def test_errors_name_the_root_cause_the_compiler_wrapped():
    try:
        try:
            raise RuntimeError("Expected inputs of BF16 type\nmore")
        except RuntimeError as inner:
            raise TypeError("RuntimeError when making fake tensor call") from inner
    except TypeError as err:
        assert bench_train._error(err) == (
            "TypeError: RuntimeError when making fake tensor call "
            "(RuntimeError: Expected inputs of BF16 type)"
        )
    try:
        try:
            raise torch_oom()
        except RuntimeError:
            raise ValueError("launch failed") from None  # kept as the context, not the cause
    except ValueError as err:
        assert bench_train._out_of_memory(err) and "OutOfMemoryError" in bench_train._error(err)


def torch_oom() -> BaseException:
    import torch

    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.mark.parametrize(
    "kw, field",
    [({"contenders": ["vllm"]}, "contenders"), ({"shapes": ["gpt4"]}, "shapes"),
     ({"checkpointing": ["all"]}, "checkpointing"), ({"steps": 0}, "steps"),
     ({"device": "tpu"}, "device"), ({"contenders": ["moekit:triton:fast"]}, "contenders"),
     ({"max_batch_contenders": ["hf:eager"]}, "max_batch_contenders"),
     ({"checkpointing_contenders": ["hf:eager"]}, "checkpointing_contenders"),
     ({"loss_chunk_tokens": -1}, "loss_chunk_tokens")],
)  # fmt: skip
def test_bad_options_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        TrainBench(**kw)


def test_chunked_loss_rows_say_so(tmp_path):
    report = run(**TINY, contenders=["moekit:torch"], compile=False, loss_chunk_tokens=8,
                 out_dir=str(tmp_path))  # fmt: skip
    assert report["rows"][0]["step_s"] > 0
    assert "LM loss 8 tokens at a time" in Path(report["files"][0]).read_text()


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
