"""Trainer options for real runs: checkpointing, time budget, load health, schedules, compile."""

import json
from dataclasses import replace

import pytest
import torch

import moekit
from moekit.train import Trainer, read_log
from moekit.train.config import HealthConfig, TrainConfig
from moekit.train.data import Prefetcher
from moekit.train.live import LiveView


def _with_router(cfg, **router):
    moe = replace(cfg.model.moe, router=moekit.RouterConfig(**router))
    return replace(cfg, model=replace(cfg.model, moe=moe))


def _steps(trainer, n):
    records = []
    for _ in range(n):
        records.append(trainer.train_step())
        trainer.step += 1
    return records


def test_checkpointed_blocks_train_the_same_numbers(tmp_path, make_run):
    runs = {}
    for mode in ("none", "blocks"):
        trainer = Trainer(make_run(tmp_path / mode, activation_checkpointing=mode, grad_accum=2))
        losses = [r["loss"] for r in _steps(trainer, 3)]
        runs[mode] = (losses, [p.detach().clone() for p in trainer.model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(runs["none"][0], runs["blocks"][0], strict=True))
    for a, b in zip(runs["none"][1], runs["blocks"][1], strict=True):
        assert torch.equal(a, b)


def test_cpu_optimizer_is_the_plain_loop(tmp_path, make_run):
    trainer = Trainer(make_run(tmp_path))
    assert not trainer.optimizer.defaults.get("fused")


def test_time_budget_stops_early_and_evals_carry_the_training_clock(tmp_path, make_run):
    cfg = make_run(tmp_path, steps=10_000, log_interval=2, eval_interval=4, time_budget_s=0.5)
    summary = Trainer(cfg).fit()
    assert 2 <= summary["step"] < 10_000 and summary["step"] % 2 == 0
    assert summary["train_time_s"] >= 0.5
    evals = [r for r in read_log(tmp_path) if r["kind"] == "eval"]
    assert evals[-1]["step"] == summary["step"]
    times = [r["train_time_s"] for r in evals]
    assert times == sorted(times) and times[-1] <= summary["train_time_s"]


def test_dead_experts_are_named_in_the_log(tmp_path, make_run, capsys):
    cfg = make_run(tmp_path, steps=6, log_interval=3, eval_interval=6, live="plain")
    cfg = _with_router(cfg, kind="sigmoid", options={"bias_update_rate": 0.0})
    cfg = replace(cfg, train=replace(cfg.train, health=HealthConfig(patience=3)))
    trainer = Trainer(cfg)
    for block in trainer.model.blocks:
        block.ffn.router.expert_bias[3] = -1e4  # expert 3 is never chosen
    trainer.fit()
    train = [r for r in read_log(tmp_path) if r["kind"] == "train"]
    flushed = [r for r in train if "health" in r]
    assert [r["step"] for r in flushed] == [3, 6]
    assert all(r["health"]["dead_experts"] == {"0": [3], "1": [3]} for r in flushed)
    assert all(0 < r["load_entropy"]["0"] < 1 for r in train)
    assert "layer 0: dead experts 3; layer 1: dead experts 3" in capsys.readouterr().out


def test_schedules_move_each_step_and_the_checkpoint_serves_the_end_value(tmp_path, make_run):
    cfg = make_run(tmp_path, steps=6, log_interval=3, eval_interval=6)
    cfg = _with_router(cfg, temperature=2.0, schedules={"temperature": "2 -> 1 over 4"})
    trainer = Trainer(cfg)
    summary = trainer.fit()
    train = [r for r in read_log(tmp_path) if r["kind"] == "train"]
    temps = [r["schedules"]["temperature"] for r in train]
    assert temps == pytest.approx([2.0, 1.75, 1.5, 1.25, 1.0, 1.0])
    assert trainer.cfg == cfg  # the run's config is a value: the schedule moved the routers
    saved = json.loads((summary["checkpoint"] / "config.json").read_text())
    router = saved["model"]["moe"]["router"]
    assert router["temperature"] == 2.0 and router["schedules"]["temperature"]["end"] == 1.0
    loaded = moekit.load(summary["checkpoint"])
    routers = [b.ffn.router for b in loaded.blocks if b.is_moe]
    assert routers and all(r.live_temperature.item() == 1.0 for r in routers)


def test_prefetcher_builds_the_same_batches_ahead(tmp_path, make_run):
    trainer = Trainer(make_run(tmp_path, grad_accum=2))
    ahead = Prefetcher(trainer._step_batches, torch.device("cpu"), depth=2, ahead=True)
    try:
        for step in (0, 1, 5, 6):  # 5: a jump, as after a resume
            got, want = ahead.get(step), trainer.batches.get(step)
            assert len(got) == 2
            for a, b in zip(got, want, strict=True):
                assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
        assert sorted(ahead._pending) == [7, 8]
    finally:
        ahead.close()


def test_plain_view_names_dead_experts(capsys):
    view = LiveView(total=4, mode="plain", title="t")
    rec = {"loss": 1.0, "aux_loss": 0.0, "lr": {"rest": 1e-3}, "grad_norm": 0.1}
    health = {"dead_experts": {"2": [0, 5]}, "collapsed_layers": ["2"]}
    view.update(2, {**rec, "tokens_per_s": 1.0, "health": health})
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "[t] load health at step 2: layer 2: dead experts 0, 5; collapsed layers 2"


@pytest.mark.parametrize(
    "kw, key",
    [({"activation_checkpointing": "layers"}, "train.activation_checkpointing"),
     ({"time_budget_s": 0.0}, "train.time_budget_s"), ({"prefetch": -1}, "train.prefetch"),
     ({"health": {"patience": 0}}, "train.health.patience"),
     ({"health": {"dead_load": 2.0}}, "train.health.dead_load"),
     ({"health": {"bogus": 1}}, "train.health")],
)  # fmt: skip
def test_bad_options_name_the_key(kw, key):
    with pytest.raises(ValueError, match=key):
        TrainConfig(**kw)


@pytest.mark.slow  # inductor compiles C++ for the CPU: minutes on a 2-core machine
def test_compiled_forward_trains_like_the_eager_one(tmp_path, make_run):
    eager = _steps(Trainer(make_run(tmp_path / "eager")), 2)
    compiled = _steps(Trainer(make_run(tmp_path / "compiled", compile=True)), 2)
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(a["loss"], b["loss"], rtol=1e-4, atol=1e-5)


def test_bf16_autocast_runs_experts_in_bf16_and_the_router_in_fp32(tmp_path, make_run):
    trainer = Trainer(make_run(tmp_path, precision="bf16"))
    moe = trainer.model.blocks[0].ffn
    seen = {}
    moe.register_forward_hook(lambda m, args, out: seen.update(y=out[0], info=out[1]))
    rec = trainer.train_step()
    assert seen["y"].dtype == torch.bfloat16  # stage 3 in the autocast dtype
    assert seen["info"].routing.weights.dtype == torch.float32  # router math stays float32
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # master weights
    assert torch.isfinite(rec["loss"])


def test_dashboard_draws_load_health_with_the_dead_expert_ids():
    from moekit.viz import dashboard_figure
    from moekit.viz.style import text_overlaps

    records = []
    for step in range(1, 31):
        rec = {"kind": "train", "step": step, "loss": 1.0, "task_loss": 1.0}
        rec["expert_load"] = {"0": [0.5, 0.5, 0.0, 0.0], "1": [0.25] * 4}
        rec["load_entropy"] = {"0": 0.5, "1": 1.0}
        if step % 10 == 0:
            dead = {"0": [2, 3]} if step >= 20 else {}
            rec["health"] = {"dead_experts": dead, "collapsed_layers": ["0"] * (step >= 20)}
        records.append(rec)
    fig = dashboard_figure(records)
    titles = [ax.get_title() for ax in fig.axes]
    assert "load entropy (collapsed: layer 0)" in titles and "dead experts" in titles
    dead_ax = fig.axes[titles.index("dead experts")]
    labels = [t.get_text() for t in dead_ax.get_legend().get_texts()]
    assert labels == ["layer 0 (now 2, 3)", "layer 1"]
    assert text_overlaps(fig) == []
    healthy = dashboard_figure(
        [
            {**r, "health": {"dead_experts": {}, "collapsed_layers": []}} if "health" in r else r
            for r in records[:10]
        ]
    )
    assert "dead experts" not in [ax.get_title() for ax in healthy.axes]
