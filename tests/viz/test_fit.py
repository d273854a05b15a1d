"""Every chart a bench or command writes, rendered at the size it is saved on small made-up
data: no title, label or tick label reaches past the figure's edge, and none overlaps another."""

import warnings

import numpy as np
import pandas as pd
import pytest
from tests.viz.test_plots import _records

from moekit.bench import hf, layer, memory, moe_vs_dense, system, train
from moekit.bench.charts import Chart, Panel, Series, auto_chart, chart_figure
from moekit.bench.serve_report import serve_chart
from moekit.tasks.finance import ASSET_CLASSES
from moekit.viz import (
    dashboard_figure,
    finance,
    signals,
    specialisation_figure,
    sweep,
    trajectories,
)
from moekit.viz.figure import settle
from moekit.viz.routing import expert_load_figure
from moekit.viz.style import clipped_texts, drawn_texts, styled, text_overlaps

RNG = np.random.default_rng(0)


def readable(fig):
    """The figure's problems as saved: texts cut off by its edge, pairs of texts that overlap
    (a layout that gave up, its panels squeezed to nothing, fails at once)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="constrained_layout not applied")
        settle(fig)
        assert drawn_texts(fig)
        return clipped_texts(fig), text_overlaps(fig)


SHAPES = ("qwen3-30b-a3b", "Mixtral-8x7B layers (E8 k2 D4096 H14336)")


def _train_rows():
    """Rows as `bench train` records them: contender x shape x checkpointing."""
    return [
        {"shape": shape, "contender": name, "compiled": name.startswith("moekit"),
         "checkpointing": ckpt, "step_s": RNG.uniform(0.05, 0.4), "mfu": RNG.uniform(0.05, 0.4),
         "peak_gib": RNG.uniform(10, 70)}
        for shape in SHAPES for name in ("moekit:triton", "moekit:grouped_mm", "hf:grouped_mm")
        for ckpt in ("none", "blocks")
    ]  # fmt: skip


def _hf_rows():
    """Rows as `bench hf` records them: shape x experts_implementation."""
    return [
        {"shape": shape, "implementation": impl, "fwd_tok_s": RNG.uniform(1e4, 1e6),
         "fwd_bwd_tok_s": RNG.uniform(1e4, 3e5), "decode_b1_tok_s": RNG.uniform(100, 500),
         "decode_b32_tok_s": RNG.uniform(500, 2e4)}
        for shape in SHAPES for impl in ("eager", "grouped_mm", "moekit")
    ]  # fmt: skip


def _serve(peer=True):
    pct = lambda m: {"p50": m, "p90": 1.5 * m, "p99": 2 * m}  # noqa: E731
    rows = [{"concurrency": c, "tokens_per_s": 100.0 * c, "ttft_s": pct(0.01 * c),
             "itl_s": pct(0.002 * c)} for c in (1, 8, 32)]  # fmt: skip
    lines = [{"concurrency": c, "tokens_per_s": 80.0 * c} for c in (1, 32)]
    return rows, [{"peer": "static-compile", "status": "ok", "lines": lines}] if peer else []


def _layer_chart():
    lines = [Series(f"method {i}", [16, 64, 256], [1.0 * i, 2.0 * i, 4.0 * i]) for i in (1, 2, 3)]
    bars = Series("fwd+bwd", ["moekit[torch]", "moekit[grouped_mm]", "naive loop", "dense"],
                  [3.0, 2.0, 9.0, 1.0])  # fmt: skip
    return Chart("layer", [Panel("time", lines, "tokens T", "ms", logx=True, note="min-max"),
                           Panel("bars", [bars], "", "ms", kind="bar"),
                           Panel("stages", [bars], "", "ms", kind="barh")])  # fmt: skip


def _layer_rows():
    names = ["moekit[torch]", "moekit[grouped_mm]", "naive loop (HF Mixtral style)",
             "dense-eq (same FLOPs, no routing)"]  # fmt: skip
    return [
        {"shape": "mixtral-ish (E8 k2)", "contender": c, "tokens": t, "fwd_bwd_ms": ms,
         "fwd_bwd_ms_min": ms * 0.9, "fwd_bwd_ms_max": ms * 1.1, "speedup_vs_naive_fwd_bwd": 2.0,
         "saved_mib": 3.0 * t / 64, "peak_mib": None}
        for c in names for t in (64, 256, 1024) for ms in [RNG.uniform(1, 10) * t / 64]
    ]  # fmt: skip


def _system_rows():
    return [
        {"variant": v, "tokens_per_s": RNG.uniform(1e3, 1e4), "tokens_per_s_min": 900.0,
         "tokens_per_s_max": 1.2e4, "first_step_s": RNG.uniform(0.1, 30), "saved_mib": 12.0,
         "peak_mib": None}
        for v in ("default", "compile", "activation checkpointing", "compile + checkpointing")
    ]  # fmt: skip


def _memory_runs():
    return [
        {"nodes": n, "query_median_ms": n / 1e3, "query_min_ms": n / 2e3, "query_p95_ms": n / 5e2,
         "query_batched_ms_per_query": n / 1e4, "fill_rows_per_s": 1e5, "open_s": 0.01 * n,
         "db_mib": n / 100} for n in (100, 1000, 10000)
    ]  # fmt: skip


BENCH = {
    "bench layer": lambda: layer._chart(_layer_rows(), "cpu", 5),
    "bench system": lambda: system._chart(_system_rows(), "cpu", 10),
    "bench memory": lambda: memory._chart(_memory_runs(), 32),
    "bench train": lambda: train._chart(_train_rows(), "MoE training step at size, cuda"),
    "bench hf": lambda: hf._chart(_hf_rows(), [1, 32], 4096, "HF MoE layers, cuda"),
    "one contender": lambda: train._chart(_train_rows()[:1], "one"),
    "serve": lambda: serve_chart(*_serve(), "Serving benchmark: ckpt, cuda"),
    "serve alone": lambda: serve_chart(*_serve(peer=False), "Serving benchmark: ckpt, cpu"),
    "auto bars": lambda: auto_chart(
        {
            "rows": [
                {"implementation": f"implementation {i}", "fwd_tok_s": 10.0 * i}
                for i in range(1, 6)
            ]
        },
        "auto",
    ),  # fmt: skip
    "layer": _layer_chart,
}


@pytest.mark.parametrize("name", list(BENCH))
def test_bench_charts_fit(name):
    assert readable(chart_figure(BENCH[name]())) == ([], [])


def test_grouped_bars_name_each_contender_in_one_legend_under_level_labels():
    fig = chart_figure(BENCH["bench train"]())
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()][:2] == [
        "moekit:triton (compiled), ckpt none",
        "moekit:triton (compiled), ckpt blocks",
    ]
    ticks = fig.axes[0].get_xticklabels()
    assert [t.get_rotation() for t in ticks] == [0, 0] and "\n" in ticks[1].get_text()
    assert [ax.get_title() for ax in fig.axes] == ["step time", "MFU", "peak memory"]


def test_serve_chart_plots_results_against_concurrency_with_the_peer():
    chart = serve_chart(*_serve(), "s")
    assert [p.title for p in chart.panels] == [
        "output tokens/s",
        "time to first token, moekit serve",
        "inter-token latency, moekit serve",
    ]
    assert [s.label for s in chart.panels[0].series] == [
        "moekit serve",
        "transformers static-compile",
    ]
    assert chart.panels[1].ylabel == "ms" and chart.panels[1].series[0].y == [10.0, 80.0, 320.0]


def _finance():
    dates = pd.date_range("2020-01-01", periods=90, freq="D")
    names = [("SPX", "D", ASSET_CLASSES[0]), ("GOLD", "D", ASSET_CLASSES[1]),
             ("BUND", "W", ASSET_CLASSES[2])]  # fmt: skip
    pred = pd.DataFrame([
        {"instrument": n, "freq": f, "asset_class": c, "date": d, "expert": int(RNG.integers(4)),
         "rv_rule_pct": RNG.uniform(0.3, 3), "ret": RNG.normal(0, 0.01),
         "router_maxprob": RNG.uniform(0.3, 1)}
        for n, f, c in names for d in dates
    ])  # fmt: skip
    by_inst = pd.DataFrame([
        {"instrument": n, "asset_class": c, "qlike_moe": RNG.uniform(0, 1),
         "qlike_garch": RNG.uniform(0, 1), "top_expert_share": RNG.uniform(0.3, 1),
         "top_expert": i % 4} for i, (n, _, c) in enumerate(names)
    ])  # fmt: skip
    summary = pd.DataFrame([
        {"asset_class": c, "method": m, "mean": RNG.uniform(0.1, 2), "low": np.nan, "high": np.nan}
        for c in ASSET_CLASSES for m in ("MoE", "GARCH", "HAR")
    ])  # fmt: skip
    dm = pd.DataFrame([{"group": c, "stat": RNG.normal(), "p_value": RNG.uniform()}
                       for c in ASSET_CLASSES])  # fmt: skip
    return pred, by_inst, summary, dm


def _sweep():
    return [
        {"point": {"router": r, "k": k, "experts": e, "capacity_factor": cf},
         "tokens_per_s": RNG.uniform(1e3, 5e3), "quality": RNG.uniform(0.1, 1),
         "load_imbalance": RNG.uniform(1, 3), "dropped_fraction": RNG.uniform(0, 0.2)}
        for r in ("topk", "expert_choice") for k in (1, 2) for e in (4, 8) for cf in (1.0, None)
    ]  # fmt: skip


def _paths(c, n, length):
    return np.cumsum(RNG.normal(size=(c, n, length, 3)), axis=-2)


def _figures():
    pred, by_inst, summary, dm = _finance()
    names = ["sine", "square", "saw", "chirp"]
    truth, guess = RNG.normal(size=(4, 3, 24)), RNG.normal(size=(4, 3, 24))
    paths, rolled = _paths(4, 3, 16), _paths(4, 3, 16)
    routing = {str(layer): RNG.integers(0, 20, (4, 8)).tolist() for layer in range(4)}
    loads = [list(RNG.dirichlet(np.ones(128))) for _ in range(24)]
    return {
        "dashboard moe": lambda: dashboard_figure(_records(steps=200, layers=("0", "1", "2"))),
        "dashboard dense": lambda: dashboard_figure(_records(moe=False)),
        "dashboard metric and memory": lambda: dashboard_figure(
            _records(steps=200, layers=("0", "1", "2"), metric="bpb", mem=True), metric="bpb"
        ),
        "dashboard dense metric and memory": lambda: dashboard_figure(
            _records(moe=False, metric="mse", mem=True), metric="mse"
        ),
        "specialisation": lambda: specialisation_figure(routing, names),
        "route-report small": lambda: expert_load_figure(
            ["m.layers.0.g", "m.layers.1.g"], [[0.4, 0.3, 0.2, 0.1]] * 2
        ),  # fmt: skip
        "route-report large": lambda: expert_load_figure(
            [f"model.layers.{i}.mlp.gate" for i in range(24)], loads
        ),
        "moe vs dense curves": lambda: styled(moe_vs_dense._curves_figure)(
            {
                (m, seed): {"time_s": [60.0, 120.0, 180.0], "val_loss": [2.0, 1.5, 1.2]}
                for m in moe_vs_dense.MODELS
                for seed in (0, 1)
            },
            "MoE vs dense",
        ),  # fmt: skip
        "sweep": lambda: sweep.sweep_figure(_sweep(), "val loss"),
        "signals forecasts": lambda: signals.forecasts_figure(truth, guess, names),
        "signals errors": lambda: signals.errors_figure(truth, guess, names),
        "rollouts": lambda: trajectories.rollouts_figure(paths[:, 0], rolled[:, 0], names, 6),
        "projections": lambda: trajectories.projections_figure(paths[:, 0], rolled[:, 0], names, 6),
        "rollout errors": lambda: trajectories.errors_figure(paths, rolled, names, 6),
        "finance routing": lambda: finance.routing_heatmap_figure(pred),
        "finance conditions": lambda: finance.conditions_scatter_figure(pred),
        "finance confidence": lambda: finance.confidence_timeseries_figure(pred),
        "finance preference": lambda: finance.performance_vs_preference_figure(by_inst),
        "finance seeds": lambda: finance.seeds_figure(summary, dm, 1),
    }


FIGURES = _figures()


@pytest.mark.parametrize("name", list(FIGURES))
def test_figures_fit(name):
    assert readable(FIGURES[name]()) == ([], [])


def test_route_report_is_sized_to_its_grid_and_ticks_every_expert():
    small = expert_load_figure(["model.layers.0.mlp.gate"], [[0.4, 0.3, 0.2, 0.1]])
    ax = small.axes[0]
    assert list(ax.get_xticks()) == [0, 1, 2, 3] and ax.get_yticklabels()[0].get_text() == "layer 0"
    assert [t.get_text() for t in ax.texts] == ["1.60", "1.20", "0.80", "0.40"]
    width, _ = small.get_size_inches()
    big = FIGURES["route-report large"]()
    assert big.get_size_inches()[0] > 2 * width and not big.axes[0].texts
    assert len(big.axes[0].get_xticks()) <= 32


def test_one_seed_draws_no_interval_and_says_one_seed():
    _, _, summary, dm = _finance()
    fig = finance.seeds_figure(summary, dm, 1)
    assert fig.get_suptitle() == "One training seed"
    assert not [c for c in fig.axes[0].containers if c.errorbar is not None and c.errorbar.lines[0]]
    summary = summary.assign(low=summary["mean"] * 0.8, high=summary["mean"] * 1.2)
    assert finance.seeds_figure(summary, dm, 3).get_suptitle() == "Over 3 training seeds"


def test_specialisation_lays_four_layers_out_two_by_two_on_one_colour_scale():
    routing = {str(layer): RNG.integers(0, 20, (3, 8)).tolist() for layer in range(4)}
    fig = specialisation_figure(routing, ["a", "b", "c"])
    heatmaps = [ax for ax in fig.axes if ax.get_title()]
    spots = {(ax.get_subplotspec().rowspan.start, ax.get_subplotspec().colspan.start)
             for ax in heatmaps}  # fmt: skip
    assert spots == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert len({ax.images[0].get_clim() for ax in heatmaps}) == 1
    assert len(fig.axes) == 5  # one colour bar
