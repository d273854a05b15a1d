import json
from pathlib import Path

import pytest
import torch

from moekit.bench.report import Table, machine_info, machine_slug, write_report


def test_report_files_carry_machine_versions_date_and_command(tmp_path):
    table = Table(("size", "ms"), [(1, "0.50"), (8, "1.25")], title="sweep")
    report = write_report(
        "toy",
        "Toy benchmark",
        "moekit bench toy --sizes [1,8]",
        [table],
        {"rows": [{"size": 1, "ms": 0.5}, {"size": 8, "ms": 1.25}]},
        config={"sizes": [1, 8]},
        text=["Above the table."],
        notes=["Below the table."],
        out_dir=tmp_path,
    )
    md, js = (Path(p) for p in report["files"])
    assert md.suffix == ".md" and js.suffix == ".json" and md.stem == js.stem
    assert md.name.startswith("toy-") and md.stem.endswith(report["date"])
    data = json.loads(js.read_text())
    assert data["rows"][1] == {"size": 8, "ms": 1.25} and data["config"] == {"sizes": [1, 8]}
    assert data["command"] == "moekit bench toy --sizes [1,8]"
    for key in ("cpu", "cores", "gpu", "torch", "triton", "python"):
        assert key in data["machine"]
    assert data["machine"]["torch"] == torch.__version__
    text = md.read_text()
    assert text.startswith(f"# Toy benchmark, {report['date']}\n")
    assert "`moekit bench toy --sizes [1,8]`" in text and f"torch {torch.__version__}" in text
    assert "## sweep\n\n| size | ms |\n|---|---|\n| 1 | 0.50 |\n| 8 | 1.25 |" in text
    assert text.index("Above the table.") < text.index("| size |") < text.index("Below the")


def test_no_files_without_an_out_dir(tmp_path):
    report = write_report("toy", "Toy", "moekit bench toy", [], {}, out_dir="")
    assert report["files"] == [] and report["markdown"].startswith("# Toy, ")


def test_rows_must_match_the_columns():
    with pytest.raises(ValueError, match="rows\\[1\\] has 1 cells for 2 columns"):
        Table(("a", "b"), [(1, 2), (3,)])


def test_file_names_say_which_hardware_was_measured():
    machine = {**machine_info(), "cpu": "AMD EPYC 7B13", "cores": 2, "gpu": "NVIDIA H100 80GB"}
    assert machine_slug(machine, "cpu") == "amd-epyc-7b13-2c"
    assert machine_slug(machine, "cuda") == "nvidia-h100-80gb"
