"""`moekit bench moe-vs-dense` end to end at tiny size on a CPU, and its pieces."""

import json
from pathlib import Path

import pytest
import yaml

import moekit.bench.moe_vs_dense as bench
from moekit.bench.moe_vs_dense import (
    MoEVsDenseBench,
    bench_run_config,
    load_run_config,
    run,
    summarise,
    time_to_reach,
    variant,
    verdict,
)

TINY = {
    "task": {"name": "text", "seq_len": 16, "val_sequences": 8,
             "options": {"max_bytes": 100_000, "val_every": 10}},
    "model": {"d_model": 16, "n_layers": 2, "n_heads": 2, "max_seq_len": 16, "d_ff": 32,
              "moe": {"d_hidden": 8, "n_experts": 4, "k": 2, "backend": "torch"}},
    "train": {"batch_size": 4, "lr": 0.003, "warmup_steps": 2, "live": "off", "threads": 1,
              "precision": "fp32", "device": "cpu"},
}  # fmt: skip


def test_smoke_run_trains_three_models_and_reports(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    report = run(
        config=str(config),
        minutes=0.01,
        seeds=[0],
        calibrate_steps=4,
        evals=2,
        runs=str(tmp_path / "runs"),
        out_dir=str(tmp_path / "out"),
    )
    rows = {r["model"]: r for r in report["runs"]}
    assert set(rows) == {"moe", "dense-active", "dense-total"}
    moe, active, total = rows["moe"], rows["dense-active"], rows["dense-total"]
    assert moe["active_params"] < moe["total_params"] == pytest.approx(total["total_params"], 0.1)
    assert (
        active["flops_per_token"] < moe["flops_per_token"] < 1.05 * active["flops_per_token"]
    )  # router
    for r in rows.values():
        assert r["steps"] >= 2 and r["train_time_s"] > 0 and r["tokens"] == r["steps"] * 4 * 16
        assert r["tokens_per_s"] == pytest.approx((r["steps"] - 1) * 64 / r["train_time_s"])
    assert report["headline"][0].startswith("seed 0: the MoE")
    assert report["verdict"][0].startswith("Lowest final validation loss at equal training time")
    md = Path(report["files"][0])
    assert md.name == "moe-vs-dense-cpu.md" and "](moe-vs-dense-cpu.png)" in md.read_text()
    assert "Budget: 3 runs of 0.01 min on the training clock each" in md.read_text()
    assert Path(report["curves_png"]).read_bytes()[:4] == b"\x89PNG"
    assert json.loads(md.with_suffix(".json").read_text())["wall_s"] > 0
    again = run(config=str(config), seeds=[0], runs=str(tmp_path / "runs"), train=False, out_dir="")
    assert again["runs"] == report["runs"]  # --no-train reports from the run directories


def test_variants_keep_active_or_total_width(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    model = load_run_config(config).model
    assert variant(model, "moe") is model
    assert (variant(model, "dense-active").d_ff, variant(model, "dense-total").d_ff) == (16, 32)
    assert variant(model, "dense-total").moe_every == 0


def test_time_to_reach_interpolates_and_says_never():
    curve = {"time_s": [10.0, 20.0, 30.0], "val_loss": [3.0, 2.0, 1.0]}
    assert time_to_reach(curve, 1.5) == pytest.approx(25.0)
    assert time_to_reach(curve, 3.5) == 10.0
    assert time_to_reach(curve, 0.5) is None


def test_headline_names_a_seed_that_never_got_there():
    model = load_run_config_dict()
    params = {"total": 10, "active": 5}
    curves = {
        ("moe", 0): {"time_s": [60.0, 120.0], "val_loss": [2.0, 1.2], "steps": 4,
                     "params": params, "model": model},
        ("dense-active", 0): {"time_s": [60.0, 120.0], "val_loss": [2.5, 1.0], "steps": 4,
                              "params": params, "model": model},
    }  # fmt: skip
    _, lines = summarise(curves, 16)
    assert lines == [
        "seed 0: the MoE did not reach dense-active's final val loss 1.0000 (its own final: 1.2000)"
    ]


def test_verdict_names_the_winner_and_the_share_of_time():
    model = load_run_config_dict()
    params = {"total": 10, "active": 5}

    def curve(losses):
        return {"time_s": [60.0, 120.0], "val_loss": losses, "steps": 4, "params": params,
                "model": model}  # fmt: skip

    curves = {("moe", 0): curve([1.5, 1.0]), ("dense-active", 0): curve([2.0, 1.25])}
    rows, _ = summarise(curves, 16)
    assert verdict(rows, curves) == [
        "Lowest final validation loss at equal training time: moe, 1.0000 nats/byte (mean of "
        "1 seed); dense-active 1.2500 (+0.2500, +25.0%).",
        "Did the MoE reach dense-active's final val loss within 0.6x of dense-active's "
        "training time (read from the curves, linear between evaluations)? No (seed 0: 0.75x).",
    ]


def test_runs_calibrate_once_per_model_and_share_a_task_per_seed(tmp_path, monkeypatch):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    calls = []
    monkeypatch.setattr(bench, "build_task", lambda cfg, seed: type("T", (), {"seed": seed})())
    monkeypatch.setattr(bench, "calibrate", lambda base, name, *a: calls.append(name) or 1e3)
    monkeypatch.setattr(bench, "train_one", lambda opts, base, name, task, rate: None)
    report = run(config=str(config), seeds=[0, 1], runs=str(tmp_path / "runs"), out_dir="")
    assert calls == ["moe", "dense-active", "dense-total"]
    assert "No seed has both an MoE and a dense-active run yet." in report["markdown"]


def test_device_and_eager_override_the_run_config(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    kept = bench_run_config(MoEVsDenseBench(config=str(config)))
    assert (kept.train.device, kept.train.compile) == ("cpu", False)
    compiled = str(tmp_path / "compiled.yaml")
    Path(compiled).write_text(yaml.safe_dump(TINY | {"train": TINY["train"] | {"compile": True}}))
    changed = bench_run_config(MoEVsDenseBench(config=compiled, device="cuda", eager=True))
    assert (changed.train.device, changed.train.compile) == ("cuda", False)


def load_run_config_dict():
    from moekit.train.config import RunConfig

    return RunConfig(**TINY).model.to_dict() | {"vocab_size": 256}


@pytest.mark.parametrize(
    "kw, field",
    [({"minutes": 0}, "minutes"), ({"models": ["moe", "sparse"]}, "models"),
     ({"seeds": []}, "seeds"), ({"evals": 0}, "evals"), ({"device": "tpu"}, "device")],
)  # fmt: skip
def test_bad_options_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        MoEVsDenseBench(**kw)


def test_the_gpu_config_loads():
    cfg = load_run_config(Path(__file__).parents[2] / "configs" / "moe-vs-dense-gpu.yaml")
    assert cfg.task.options["site_packages"] and cfg.train.compile
    m = cfg.model.moe
    assert m.k * m.d_hidden == variant(cfg.model, "dense-active").d_ff == cfg.model.d_ff
