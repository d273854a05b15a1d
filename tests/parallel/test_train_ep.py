"""`moekit train CONFIG --parallel.ep N` under torchrun: expert-parallel training end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from tests.parallel.runs import quiet_trainer, tiny_ep_run

import moekit
from moekit.cli import main
from moekit.train.config import ParallelConfig

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "signals-tiny.yaml"
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _torchrun_train(out: Path, nproc: int, *options: str, timeout: float = 120):
    """`torchrun --nproc-per-node N -m moekit.cli train signals-tiny.yaml ...` on gloo."""
    env = {k: v for k, v in os.environ.items() if k not in _TORCHRUN_ENV}
    env["OMP_NUM_THREADS"] = "1"
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    cmd = [*run, "--standalone", "-m", "moekit.cli", "train", str(CONFIG), *options]
    cmd += ["--train.live", "off", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_torchrun_ep2_trains_and_writes_a_dense_checkpoint(tmp_path):
    out = tmp_path / "run"
    steps = ["--train.steps", "30", "--train.eval_interval", "30", "--train.log_interval", "5"]
    proc = _torchrun_train(out, 2, "--parallel.ep", "2", *steps)
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
    assert run["parallel"] == {"ep": 2, "dp": 1}


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


@pytest.mark.slow
def test_torchrun_ep2_inside_dp2_trains_on_four_processes(tmp_path):
    out = tmp_path / "run"
    steps = ["--train.steps", "10", "--train.eval_interval", "10", "--train.log_interval", "5"]
    parallel = ["--parallel.ep", "2", "--parallel.dp", "2"]
    proc = _torchrun_train(out, 4, *parallel, *steps, timeout=300)
    assert proc.stdout.count("checkpoint:") == 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 11))
    ckpt = out / "checkpoints" / "step-0000010"
    model = moekit.load(ckpt)
    assert model.blocks[model.moe_layers()[0]].ffn.experts.w1.shape[0] == 8  # every expert
    assert json.loads((ckpt / "run.json").read_text())["parallel"] == {"ep": 2, "dp": 2}


def _ep_inside_dp_run(rank: int, world: int, root: str) -> None:
    """Trainer at ep=2 x dp=2: experts equal on their replicas, the rest equal everywhere."""
    cfg = tiny_ep_run(Path(root), ep=2, batch_size=2, steps=4, ckpt_interval=4)
    router = moekit.RouterConfig(kind="sigmoid", options={"bias_update_rate": 0.01})
    model = replace(cfg.model, moe=replace(cfg.model.moe, router=router))
    cfg = replace(cfg, parallel=ParallelConfig(ep=2, dp=2), model=model)
    trainer = quiet_trainer(cfg)
    assert trainer.fit()["step"] == 4
    trainer.close()
    for name, t in trainer.model.state_dict().items():
        every = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(every, t.contiguous())
        same = every[rank % 2 :: 2] if ".ffn.experts." in name else every  # replicas of t
        assert all(torch.equal(o, t) for o in same), f"rank {rank}: {name} differs"
        if ".ffn.experts." in name:
            assert not torch.equal(every[0], every[1]), f"{name}: not split over ranks 0 and 1"


def test_ep2_inside_dp2_keeps_replicas_identical(launch, tmp_path):
    launch(_ep_inside_dp_run, 4, str(tmp_path))
    assert moekit.load(tmp_path / "checkpoints" / "step-0000004").cfg.moe.n_experts == 4
