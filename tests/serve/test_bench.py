"""The serving benchmark at tiny size: the load test end to end, the transformers peer, targets."""

import json
import shlex
import shutil
from pathlib import Path

import pytest

from moekit.bench.registry import bench_spec
from moekit.bench.serve import ServeBench, _peers, run
from moekit.bench.serve_models import shape_config
from moekit.bench.serve_report import _peer_table, check_targets
from moekit.cli import build_parser
from moekit.model import ModelConfig


def test_bench_serve_writes_reports(byte_ckpt, tmp_path):
    report = run(
        str(byte_ckpt),
        (1, 4),
        requests=4,
        out_dir=tmp_path,
        max_new_tokens=8,
        prompt_len=12,
        prefix_len=40,
        server_args=["--page-size", "4"],
    )
    md, js = report["files"]
    data = json.loads(Path(js).read_text())
    assert [row["concurrency"] for row in data["rows"]] == [1, 4]
    assert all(row["requests"] == 4 and row["errors"] == 0 for row in data["rows"])
    assert all(row["itl_s"]["p50"] >= 0 for row in data["rows"])
    assert data["prefix_cache"]["cache"]["hits"] >= 8  # every warm request hit
    errors = next(t for t in data["targets"] if t["target"].startswith("errors"))
    assert errors["met"] is True
    assert "| 4 | 4 |" in Path(md).read_text() and "## Targets" in Path(md).read_text()


@pytest.mark.slow  # importing transformers alone takes ~10 s of CPU
def test_peer_runs_write_a_line_per_level(byte_ckpt, tmp_path):
    pytest.importorskip("transformers")
    from moekit.bench.serve_models import export_transformers
    from moekit.bench.serve_peer import run_peer

    hf_dir = export_transformers(byte_ckpt, tmp_path / "hf")
    out = tmp_path / "peer.jsonl"
    run_peer(str(byte_ckpt), str(hf_dir), "dynamic", [2, 1], 8, 4, out, "cpu", "fp32")
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    check = lines[0]["check"]  # the transformers twin computes moekit's logits
    assert check["top1_agreement"] == 1.0 and check["relative_error"] < 1e-5
    assert [line["concurrency"] for line in lines[1:]] == [2, 1]
    assert [line["tokens"] for line in lines[1:]] == [8, 4] and lines[1]["tokens_per_s"] > 0


@pytest.mark.slow  # transformers loads in the peer's process (~10 s of CPU)
def test_bench_serve_fills_the_peer_section(byte_ckpt, tmp_path):
    pytest.importorskip("transformers")
    ckpt = shutil.copytree(byte_ckpt, tmp_path / "ckpt")  # the export lands beside it
    report = run(
        str(ckpt),
        (1,),
        requests=2,
        out_dir=tmp_path,
        max_new_tokens=4,
        prompt_len=8,
        prefix_len=20,
        peers=["dynamic"],
        peer_concurrency=[2, 1],
        peer_budget_s=600,
        server_args=["--page-size", "4"],
    )
    md, js = report["files"]
    peer = json.loads(Path(js).read_text())["peers"][0]
    assert peer["peer"] == "dynamic" and peer["status"] == "ok"
    levels = [line for line in peer["lines"] if "concurrency" in line]
    assert [(line["concurrency"], line["tokens"]) for line in levels] == [(2, 8), (1, 4)]
    text = Path(md).read_text()
    assert "## transformers, same weights" in text and "| dynamic | 2 |" in text


def test_peer_budget_is_its_own_and_a_stopped_peer_says_so(byte_ckpt, tmp_path):
    pytest.importorskip("transformers")
    ckpt = shutil.copytree(byte_ckpt, tmp_path / "ckpt")
    settings = {"prompt_len": 8, "max_new": 4, "device": "cpu", "dtype": ""}
    (row,) = _peers(str(ckpt), ["dynamic"], [2, 1], settings, budget_s=0.5)
    assert row["status"] == "stopped at its 0.5 s budget (before c=2)" and row["wall_s"] < 30
    table = _peer_table([row])
    assert table.rows == [("dynamic", "-", "-", "-", "-", row["status"])]


def test_real_shape_and_targets():
    cfg = shape_config("qwen3-moe", layers=6, max_seq_len=1024)
    assert isinstance(cfg, ModelConfig) and cfg.moe.n_experts == 128 and cfg.moe.k == 8
    assert (cfg.d_model, cfg.moe.d_hidden, cfg.n_heads, cfg.kv_heads) == (2048, 768, 32, 4)
    assert (cfg.head_dim, cfg.qk_norm, cfg.vocab_size) == (128, "head", 151936)
    rows = [
        {
            "concurrency": 1,
            "tokens_per_s": 500.0,
            "itl_s": {"p50": 0.0012},
            "errors": 0,
            "errors_5xx": 0,
        },
        {
            "concurrency": 32,
            "tokens_per_s": 9000.0,
            "itl_s": {"p50": 0.004},
            "errors": 0,
            "errors_5xx": 0,
        },
    ]
    prefix = {"prefix_tokens": 512, "speedup": 6.0, "errors": 0, "errors_5xx": 0}
    peers = [
        {
            "peer": "static-compile",
            "lines": [{"peer": "static-compile", "concurrency": 32, "tokens_per_s": 2500.0}],
        }
    ]
    met = {
        t["target"].split(" (")[0]: t["met"]
        for t in check_targets(rows, prefix, {"floor_ms": 1.0}, peers)
    }
    assert met == {
        "tokens/s at c=32 vs best transformers": True,  # 3.6x
        "c=1 inter-token p50 vs floor": True,  # 1.2 ms vs 1.0 ms
        "prefix hit TTFT vs miss": True,
        "errors / 5xx over the run": True,
    }
    with pytest.raises(ValueError, match="peers"):
        ServeBench(ckpt="x", peers=["vllm"])
    with pytest.raises(ValueError, match="peer_budget_s"):
        ServeBench(ckpt="x", peer_budget_s=-1)


def test_the_guides_bounded_command_parses():
    guide = Path(__file__).parents[2] / "docs" / "guides" / "serving.md"
    text = guide.read_text().split("The bounded command", 1)[1]
    block = text.split("```", 2)[1].replace("\\\n", " ")
    argv = shlex.split(block.split("python -m moekit.cli", 1)[1])
    args = build_parser().parse_args(argv)["bench"]
    cfg = bench_spec("serve").config(**args[args.bench].as_dict())
    assert isinstance(cfg, ServeBench) and cfg.ckpt == "/tmp/qwen3-6l" and cfg.layers == 6
    assert (cfg.concurrency, cfg.peers, cfg.peer_concurrency) == (
        [1, 8, 32],
        ["static-compile"],
        [32, 1],
    )
    assert cfg.peer_budget_s > 0 and cfg.floor and cfg.prompt_len == cfg.prefix_len == 512
