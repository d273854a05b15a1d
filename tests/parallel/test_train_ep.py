"""`moekit train CONFIG --parallel.ep N` under torchrun: expert-parallel training end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moekit
from moekit.cli import main

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "signals-tiny.yaml"
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def test_torchrun_ep2_trains_and_writes_a_dense_checkpoint(tmp_path):
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in _TORCHRUN_ENV}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--standalone",
        "-m",
        "moekit.cli",
        "train",
        str(CONFIG),
        "--parallel.ep",
        "2",
        "--train.steps",
        "30",
        "--train.eval_interval",
        "30",
        "--train.log_interval",
        "5",
        "--train.live",
        "off",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("checkpoint:") == 1  # rank 0 alone reports

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 31))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5

    ckpt = out / "checkpoints" / "step-0000030"
    model = moekit.load(ckpt)
    assert model.blocks[model.moe_layers()[0]].ffn.experts.w1.shape[0] == 8  # every expert
    x = torch.randn(2, 16, model.cfg.d_in)
    with torch.no_grad():
        assert torch.isfinite(model(x).out).all()
    run = json.loads((ckpt / "run.json").read_text())
    assert run["parallel"] == {"ep": 2}


def test_ep_without_torchrun_says_to_use_torchrun(tmp_path, capsys, monkeypatch):
    for key in _TORCHRUN_ENV:
        monkeypatch.delenv(key, raising=False)
    argv = ["train", str(CONFIG), "--parallel.ep", "2", "--out", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "parallel.ep=2" in err and "torchrun" in err


def test_ep_zero_is_rejected_naming_the_key(tmp_path, capsys):
    argv = ["train", str(CONFIG), "--parallel.ep", "0", "--out", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "parallel.ep" in capsys.readouterr().err


def test_help_lists_parallel_ep(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--parallel.ep" in capsys.readouterr().out
