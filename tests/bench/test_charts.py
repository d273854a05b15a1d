"""Every report writes a chart: the bench's own or one drawn from its rows; the PNG opens."""

import json
from pathlib import Path

from matplotlib.image import imread

from moekit.bench.charts import Chart, Panel, Series, auto_chart, chart_figure
from moekit.bench.report import write_report
from moekit.cli import main
from moekit.viz import read_panels
from moekit.viz.style import text_overlaps

SERVE_ROWS = [
    {"concurrency": c, "requests": 8, "tokens_per_s": 100.0 * c, "errors": 0,
     "latency_s": {"p50": 0.1 * c, "p90": 0.2 * c, "p99": 0.3 * c}}
    for c in (1, 8, 32)
]  # fmt: skip


def test_rows_against_an_integer_column_become_lines_with_percentile_bands():
    chart = auto_chart({"rows": SERVE_ROWS}, "serving")
    assert [p.title for p in chart.panels] == ["tokens per s", "latency s"]
    latency = chart.panels[1].series[0]
    assert latency.x == [1, 8, 32] and latency.y == [0.1, 0.8, 3.2]
    assert latency.lo == [0.1, 0.8, 3.2] and latency.hi[-1] == 32 * 0.3
    assert chart.panels[0].logx and chart.panels[0].series[0].lo is None  # a plain number
    assert [p.ylabel for p in chart.panels] == ["per second", "s"]  # the unit the key ends in


def test_rows_without_an_integer_column_become_bars_per_row_label():
    rows = [
        {"shape": "a", "implementation": impl, "fwd_tok_s": v, "decode_b1_tok_s": v / 2}
        for impl, v in (("eager", 10.0), ("moekit", 30.0))
    ]
    chart = auto_chart({"rows": rows}, "hf")
    assert [p.kind for p in chart.panels] == ["bar", "bar"]
    assert chart.panels[0].series[0].x == ["eager", "moekit"]
    assert auto_chart({"rows": rows[:1]}, "one row") is None
    assert auto_chart({"shapes": {}}, "no rows") is None


def test_report_writes_the_png_beside_the_markdown(tmp_path):
    report = write_report(
        "toy", "Toy", "moekit bench toy", [], {"rows": SERVE_ROWS}, out_dir=tmp_path
    )
    png = Path(report["chart"]["file"])
    assert png.parent == tmp_path and png.suffix == ".png" and imread(png).ndim == 3
    assert read_panels(png) == report["chart"]["panels"] == ["tokens per s", "latency s"]
    assert f"![Toy]({png.name})" in Path(report["files"][0]).read_text()
    assert json.loads(Path(report["files"][1]).read_text())["chart"]["file"] == str(png)
    none = write_report(
        "toy2", "Toy", "moekit bench toy", [], {"rows": SERVE_ROWS}, out_dir=tmp_path, chart=False
    )
    assert "chart" not in none and not list(tmp_path.glob("toy2*.png"))


def test_bench_memory_command_writes_its_chart(tmp_path, capsys):
    argv = ["bench", "memory", "--sizes", "[50,200]", "--dim", "8", "--queries", "4"]
    assert main([*argv, "--top-k", "3", "--out-dir", str(tmp_path)]) == 0
    png = next(tmp_path.glob("memory-*.png"))
    assert f"wrote {png}" in capsys.readouterr().out
    assert read_panels(png) == ["query latency", "bulk fill", "reopen", "database file"]


def test_chart_labels_do_not_overlap():
    lines = [
        Series(
            f"method {i}", [16, 64, 256], [1.0 * i, 2.0 * i, 4.0 * i], [0.5 * i] * 3, [5.0 * i] * 3
        )
        for i in (1, 2, 3)
    ]
    bars = Series(
        "fwd+bwd",
        ["moekit[torch]", "moekit[grouped_mm]", "naive loop", "dense-eq"],
        [3.0, 2.0, 9.0, 1.0],
    )
    floor = Series("floor", [16, 256], [0.5, 2.0])
    time = Panel("time", lines, "tokens T", "ms", logx=True, logy=True, floor=floor, note="min-max")
    bar = Panel("bars", [bars], "", "ms", kind="bar")
    chart = Chart("toy", [time, bar, Panel("stages", [bars], "", "ms", kind="barh")])
    assert text_overlaps(chart_figure(chart)) == []
