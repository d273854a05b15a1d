"""`moekit profile`: one step under torch.profiler, by stage, with a trace that loads."""

import json

import pytest
import yaml

from moekit.cli import main
from moekit.profiling import ProfileConfig, stage_times
from moekit.ranges import stage
from moekit.viz import read_panels

TINY_RUN = {
    "task": {"name": "signals", "seq_len": 8, "val_sequences": 8},
    "model": {
        "d_model": 16,
        "n_layers": 2,
        "n_heads": 2,
        "max_seq_len": 8,
        "d_ff": 16,
        "moe_every": 2,
        "moe": {"d_hidden": 8, "n_experts": 4, "k": 2},
    },
    "train": {"batch_size": 2, "threads": 1},
}


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(TINY_RUN))
    return path


@pytest.mark.parametrize("mode", ["train", "decode"])
def test_profile_writes_a_loadable_trace_and_a_table_of_stages(config, tmp_path, mode, capsys):
    out = tmp_path / mode
    assert main(["profile", str(config), "--mode", mode, "--warmup", "1", "--out", str(out)]) == 0
    trace = json.loads((out / "trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"forward", "attention", "moe.router", "moe.plan", "moe.experts"} <= names
    result = json.loads((out / "stages.json").read_text())
    stages = {r["stage"].split(" (")[0]: r for r in result["stages"]}
    assert stages["router"]["ms"] > 0 and stages["experts"]["ms"] > 0
    assert ("backward" in stages) == (mode == "train") == ("optimizer" in stages)
    assert result["memory"]["peak_rss_mib"] > 0
    assert abs(sum(r["share"] for r in result["stages"]) - 1) < 1e-6
    assert read_panels(out / "stages.png") == ["where the time goes"]
    assert "| router |" in capsys.readouterr().out


def test_stage_ranges_exist_only_under_a_profiler():
    from torch.profiler import profile

    assert stage("x").__class__.__name__ == "nullcontext"
    with profile() as prof, stage("named"):
        pass
    assert "named" in {e.name for e in prof.events()}
    assert stage_times(list(prof.events()), step_ms=1.0)[-1]["stage"] == "rest of the step"


def test_bad_options_name_the_field(config):
    with pytest.raises(ValueError, match="mode"):
        ProfileConfig(str(config), mode="serve")
    with pytest.raises(FileNotFoundError, match="no such config"):
        from moekit.profiling import profile_step

        profile_step(ProfileConfig("/nonexistent/run.yaml"))
