"""`moekit sweep`: grid points, resume without rerunning finished points, table and plots."""

import json
import os
import signal

import pytest
import yaml
from matplotlib.image import imread

from moekit.cli import build_parser, main
from moekit.sweep import SweepConfig, capacity_value, point_id, read_results, run_sweep
from moekit.viz import read_panels

TINY_RUN = {
    "task": {"name": "signals", "seq_len": 8, "val_sequences": 8},
    "model": {
        "d_model": 16,
        "n_layers": 1,
        "n_heads": 2,
        "max_seq_len": 8,
        "d_ff": 16,
        "moe": {"d_hidden": 8, "n_experts": 4, "k": 2},
    },
    "train": {"batch_size": 4, "eval_interval": 2, "log_interval": 1, "threads": 1},
}


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(TINY_RUN))
    return path


def test_resume_skips_finished_points_and_runs_only_new_ones(config, tmp_path):
    out = tmp_path / "sweep"
    cfg = dict(config=str(config), experts=[2, 4], k=[1], steps=2, out=str(out), live="off")
    first = run_sweep(SweepConfig(**cfg, capacity_factor=[1.0]))
    assert first["ran"] == ["E2-k1-cf1-topk", "E4-k1-cf1-topk"] and first["reused"] == []
    again = run_sweep(SweepConfig(**cfg, capacity_factor=[1.0]))
    assert again["ran"] == [] and again["reused"] == first["ran"]
    grown = run_sweep(SweepConfig(**cfg, capacity_factor=[1.0, "none"]))
    assert grown["ran"] == ["E2-k1-cfnone-topk", "E4-k1-cfnone-topk"]
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 4 and len(read_results(out)) == 4
    record = read_results(out)["E4-k1-cf1-topk"]
    assert record["metric"] == "mse" and record["quality"] > 0 and record["tokens_per_s"] > 0
    assert 0 <= record["dropped_fraction"] <= 1 and record["load_imbalance"] >= 1
    assert "| E2-k1-cfnone-topk |" in (out / "sweep.md").read_text()
    assert imread(grown["files"]["plots"]).ndim == 3
    assert read_panels(grown["files"]["plots"]) == [
        "quality vs throughput",
        "load balance vs quality",
        "dropped token-slots vs capacity",
    ]


def test_refused_points_are_recorded_once_and_plot_redraws_a_point(config, tmp_path):
    out = tmp_path / "sweep"
    cfg = SweepConfig(str(config), experts=[2], k=[1, 3], steps=2, out=str(out), live="off")
    result = run_sweep(cfg)
    refused = read_results(out)["E2-k3-cfnone-topk"]
    assert "k=3" in refused["skipped"] and refused.get("quality") is None
    assert run_sweep(cfg)["ran"] == []
    assert main(["plot", str(out / "points" / result["ran"][0])]) == 0
    plots = out / "points" / "E2-k1-cfnone-topk" / "plots"
    assert {"dashboard.png", "signals_errors.png"} <= {p.name for p in plots.iterdir()}


def test_command_line_axes_parse_into_the_config(config):
    argv = ["sweep", str(config), "--capacity", "[1.0,none]", "--experts", "[4,8]"]
    args = build_parser().parse_args(argv).sweep
    assert args.capacity == [1.0, "none"] and args.experts == [4, 8]
    cfg = SweepConfig(str(config), capacity_factor=args.capacity, experts=args.experts)
    assert cfg.capacity_factor == [1.0, None]


def test_grid_file_fills_the_axes_flags_leave_empty(tmp_path, config):
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        yaml.safe_dump({"experts": [4, 8], "capacity_factor": [1.25, "dropless"], "steps": 7})
    )
    cfg = SweepConfig.with_grid(grid, config=str(config), experts=[16], k=[], router=["sinkhorn"])
    assert cfg.experts == [16] and cfg.capacity_factor == [1.25, None] and cfg.steps == 7
    assert point_id({"experts": 16, "k": 2, "capacity_factor": None, "router": "sinkhorn"}) == (
        "E16-k2-cfnone-sinkhorn"
    )
    with pytest.raises(ValueError, match="capacity_factor"):
        capacity_value("lots")
    with pytest.raises(ValueError, match="router"):
        SweepConfig(str(config), router=["nope"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps({"experts": [2], "lr": 1}))
    with pytest.raises(ValueError, match="keys must be among"):
        SweepConfig.with_grid(bad, config=str(config))


def _interrupt_at(monkeypatch, step: int, times: int = 1) -> None:
    """Ctrl-C (SIGINT to this process) during training step `step` of every Trainer."""
    from moekit.train.trainer import Trainer

    real = Trainer.train_step

    def train_step(self):
        if self.step + 1 == step:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)
        return real(self)

    monkeypatch.setattr(Trainer, "train_step", train_step)


def test_ctrl_c_never_records_the_running_point_and_a_rerun_resumes_it(
    config, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "sweep"
    argv = ["sweep", str(config), "--experts", "[2]", "--k", "[1]", "--steps", "4"]
    argv += ["--out", str(out)]
    with monkeypatch.context() as patch:
        _interrupt_at(patch, 3)
        assert main(argv) == 130
    err = capsys.readouterr().err
    assert "stopped at step 3 of 4" in err and "again to resume" in err and "Traceback" not in err
    assert read_results(out) == {}
    log = out / "points" / "E2-k1-cfnone-topk" / "metrics.jsonl"
    first = [json.loads(line) for line in log.read_text().splitlines()]
    assert main(argv) == 0
    record = read_results(out)["E2-k1-cfnone-topk"]
    assert record["quality"] is not None and "skipped" not in record
    again = [json.loads(line) for line in log.read_text().splitlines()]
    train = [r for r in again if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert train[0] == next(r for r in first if r["kind"] == "train")  # resumed, not rerun
