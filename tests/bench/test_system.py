from matplotlib.image import imread

from moekit.bench.system import run
from moekit.viz import read_panels


def test_system_switches_report_throughput_and_memory(tmp_path):
    sizes = {"d_model": 16, "n_layers": 1, "n_experts": 4, "k": 2, "batch": 2, "seq": 8}
    report = run(variants=["eager", "checkpointing"], steps=2, out_dir=str(tmp_path), **sizes)
    eager, ckpt = report["rows"]
    assert eager["variant"] == "eager" and eager["tokens_per_s"] > 0
    assert eager["step_ms_min"] <= eager["step_ms"] <= eager["step_ms_max"]
    assert ckpt["saved_mib"] < eager["saved_mib"]  # recomputed blocks keep nothing for backward
    png = report["chart"]["file"]
    assert imread(png).ndim == 3
    assert read_panels(png) == ["training throughput", "first step (compiles)", "activations saved"]
    assert report["command"].startswith("moekit bench system --variants [eager,checkpointing]")
