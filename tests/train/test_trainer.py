import json

import pytest
import torch

from moekit.train import RunConfig, TrainConfig, Trainer, list_checkpoints, read_log
from moekit.viz import plot_training, read_panels


def test_fit_writes_logs_checkpoints_and_plots(tmp_path, make_run):
    cfg = make_run(tmp_path, steps=10, log_interval=4, eval_interval=5, keep_last=1, keep_best=1)
    summary = Trainer(cfg, plotter=plot_training).fit()
    records = read_log(tmp_path)
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 11))
    first = train[0]
    for key in (
        "loss",
        "task_loss",
        "aux_loss",
        "load_balance",
        "z_loss",
        "grad_norm",
        "tokens_per_s",
        "step_ms",
        "peak_mem_mib",
    ):
        assert isinstance(first[key], float), key
    assert first["step_ms"] > 0 and first["peak_mem_mib"] > 0
    assert set(first["lr"]) == {"router", "experts", "rest"}
    assert set(first["expert_load"]) == {"0", "1"} and len(first["expert_load"]["0"]) == 4
    assert sum(first["expert_load"]["1"]) == pytest.approx(1.0, abs=1e-5)
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [5, 10]
    assert len(evals[-1]["routing"]["0"]) == 9  # signal categories x experts
    # total routed token-slots = 16 val sequences x 16 positions x k=2
    assert sum(map(sum, evals[-1]["routing"]["0"])) == 16 * 16 * 2
    kept = list_checkpoints(tmp_path / "checkpoints")
    best = min((c for c in kept), key=lambda c: c["metric"])
    assert kept[-1]["step"] == 10 and best["metric"] == min(r["mse"] for r in evals)
    assert {p.name for p in summary["plots"]} == {
        "dashboard.png",
        "specialisation.png",
        "signals_forecasts.png",  # the task's own analysis (viz.tasks)
        "signals_errors.png",
    }
    assert json.loads((tmp_path / "run.json").read_text())["moe_layers"] == [0, 1]
    panels = read_panels(tmp_path / "plots" / "dashboard.png")
    assert {"validation MSE", "peak memory"} <= set(panels)  # the task's metric, from run.json


def test_grad_accum_averages_micro_batches(tmp_path, make_run):
    one = Trainer(make_run(tmp_path / "a", grad_accum=2))
    rec = one.train_step()
    assert rec["step"] == 1 and rec["loss"].dim() == 0


@pytest.mark.parametrize(
    "section, kw, key",
    [
        ("train", dict(steps=0), "train.steps"),
        ("train", dict(precision="fp8"), "train.precision"),
        ("train", dict(lr=-1.0), "train.lr"),
        ("train", dict(live="fancy"), "train.live"),
    ],
)
def test_bad_train_values_name_the_key(section, kw, key):
    with pytest.raises(ValueError, match=key):
        TrainConfig(**kw)


def test_run_config_checks_context_length():
    from moekit.model import ModelConfig
    from moekit.tasks import TaskConfig

    with pytest.raises(ValueError, match="max_seq_len"):
        RunConfig(task=TaskConfig(seq_len=64), model=ModelConfig(max_seq_len=32))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_steps_on_cpu(tmp_path, make_run, precision):
    trainer = Trainer(make_run(tmp_path, precision=precision))
    before = [p.detach().clone() for p in trainer.model.parameters()]
    for _ in range(20):  # fp16: the scaler skips steps whose scaled gradients overflow
        rec = trainer.train_step()
        trainer.step += 1
        if torch.isfinite(rec["grad_norm"]):
            break
    assert torch.isfinite(rec["loss"]) and torch.isfinite(rec["grad_norm"])
    after = list(trainer.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert trainer.scaler.is_enabled() == (precision == "fp16")


def test_run_config_reads_the_flat_task_layout_of_older_runs() -> None:
    """A run.json saved before task options were nested still loads, its options moved."""
    from moekit.train.config import RunConfig

    cfg = RunConfig(task={"name": "signals", "noise": 0.2, "seq_len": 32})
    assert cfg.task.options == {"noise": 0.2}
    with pytest.raises(ValueError, match=r"unknown model key\(s\): bogus"):
        RunConfig(model={"bogus": 1})
