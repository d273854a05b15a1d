"""`moekit bench moe-vs-dense` end to end at tiny size on a CPU, and its pieces."""

from pathlib import Path

import pytest
import yaml

from moekit.bench.moe_vs_dense import (
    MoEVsDenseBench,
    load_run_config,
    run,
    summarise,
    time_to_reach,
    variant,
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
    assert all(r["steps"] >= 2 and r["train_time_s"] > 0 for r in rows.values())
    assert report["headline"][0].startswith("seed 0: the MoE")
    md = Path(report["files"][0])
    assert md.name.startswith("moe-vs-dense-") and "-curves.png)" in md.read_text()
    assert Path(report["curves_png"]).read_bytes()[:4] == b"\x89PNG"
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


def load_run_config_dict():
    from moekit.train.config import RunConfig

    return RunConfig(**TINY).model.to_dict() | {"vocab_size": 256}


@pytest.mark.parametrize(
    "kw, field",
    [({"minutes": 0}, "minutes"), ({"models": ["moe", "sparse"]}, "models"),
     ({"seeds": []}, "seeds"), ({"evals": 0}, "evals")],
)  # fmt: skip
def test_bad_options_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        MoEVsDenseBench(**kw)


def test_the_gpu_config_loads():
    cfg = load_run_config(Path(__file__).parents[2] / "configs" / "moe-vs-dense-gpu.yaml")
    assert cfg.task.options["site_packages"] and cfg.train.compile
    m = cfg.model.moe
    assert m.k * m.d_hidden == variant(cfg.model, "dense-active").d_ff == cfg.model.d_ff
