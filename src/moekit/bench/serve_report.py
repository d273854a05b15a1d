"""Tables, paragraphs and target checks of the serving benchmark report.

Targets (from the issue that set them): output tokens/s at c = 32 at least 3x the best
transformers configuration; c = 1 inter-token latency (p50) within 1.5x of the measured floor;
a prefix-cache hit's TTFT at least 5x lower than a miss; no errors and no 5xx at all.
"""

from __future__ import annotations

from typing import Any

from moekit.bench.charts import Chart, Panel, Series
from moekit.bench.report import Table

TARGET_CONCURRENCY = 32
SPEEDUP_VS_PEERS = 3.0
FLOOR_SLACK = 1.5
PREFIX_SPEEDUP = 5.0


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def _p(d: dict[str, float], keys: tuple[str, ...] = ("p50", "p99")) -> str:
    return "/".join(_ms(d[k]) for k in keys)


def _moekit_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(
        (
            "concurrency",
            "requests",
            "req/s",
            "output tokens/s",
            "latency p50/p99 (ms)",
            "TTFT p50/p99 (ms)",
            "inter-token p50/p99 (ms)",
            "errors (5xx)",
        ),
        title="moekit serve",
    )
    for r in rows:
        table.rows.append(
            (
                r["concurrency"],
                r["requests"],
                f"{r['req_per_s']:.2f}",
                f"{r['tokens_per_s']:.1f}",
                _p(r["latency_s"]),
                _p(r["ttft_s"]),
                _p(r["itl_s"]),
                f"{r['errors']} ({r['errors_5xx']})",
            )
        )
    return table


def _peer_levels(peer_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [line for p in peer_rows for line in p["lines"] if "concurrency" in line]


def _peer_table(peer_rows: list[dict[str, Any]]) -> Table:
    table = Table(
        ("transformers", "concurrency", "output tokens/s", "timed run (s)", "warm-up (s)", "note"),
        title="transformers, same weights",
    )
    for p in peer_rows:
        levels = [line for line in p["lines"] if "concurrency" in line]
        for line in levels:
            if "error" in line:
                table.rows.append((p["peer"], line["concurrency"], "-", "-", "-", line["error"]))
                continue
            table.rows.append(
                (
                    p["peer"],
                    line["concurrency"],
                    f"{line['tokens_per_s']:.1f}",
                    f"{line['wall_s']:.2f}",
                    f"{line['warmup_s']:.1f}",
                    "",
                )
            )
        if not levels or p["status"] != "ok":
            table.rows.append((p["peer"], "-", "-", "-", "-", p["status"]))
    return table


def _peer_series(peer_rows: list[dict[str, Any]], key: str, scale: float) -> list[Series]:
    """Each peer's `key` per concurrency, where it measured one (a p50 for a percentile dict)."""
    out = []
    for p in peer_rows:
        levels = sorted(
            (line for line in p["lines"] if "concurrency" in line and key in line),
            key=lambda line: line["concurrency"],
        )
        if levels:
            y = [line[key]["p50"] if isinstance(line[key], dict) else line[key] for line in levels]
            x = [line["concurrency"] for line in levels]
            out.append(Series(f"transformers {p['peer']}", x, [v * scale for v in y]))
    return out


def serve_chart(rows: list[dict[str, Any]], peer_rows: list[dict[str, Any]], title: str) -> Chart:
    """Output tokens/s, time to first token and inter-token latency against concurrency:
    moekit's median with a p50-p99 band, the peers on the same axes where they measured it."""
    rows = sorted(rows, key=lambda r: r["concurrency"])
    levels = [r["concurrency"] for r in rows] + [
        line["concurrency"] for line in _peer_levels(peer_rows)
    ]
    wide = max(levels) / max(1, min(levels)) >= 8
    x = [r["concurrency"] for r in rows]
    speed = Series("moekit serve", x, [r["tokens_per_s"] for r in rows])
    panels = [
        Panel("output tokens/s", [speed, *_peer_series(peer_rows, "tokens_per_s", 1.0)],
              "concurrent requests", "tokens/s (all requests)", logx=wide)
    ]  # fmt: skip
    for key, name in (("ttft_s", "time to first token"), ("itl_s", "inter-token latency")):
        ms = [{k: v * 1e3 for k, v in r[key].items()} for r in rows]
        ours = Series("moekit serve", x, [d["p50"] for d in ms], [d["p50"] for d in ms],
                      [d["p99"] for d in ms])  # fmt: skip
        peers = _peer_series(peer_rows, key, 1e3)
        panels.append(
            Panel(name if peers else f"{name}, moekit serve", [ours, *peers], "concurrent requests",
                  "ms", logx=wide, note="median; band: p50 to p99")
        )  # fmt: skip
    return Chart(title, panels, cols=3)


def check_targets(
    rows: list[dict[str, Any]],
    prefix: dict[str, Any],
    floor: dict[str, Any] | None,
    peer_rows: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """Each target: name, measured value, bound, met (None when it could not be measured)."""
    out = []
    ours = {r["concurrency"]: r for r in rows}
    best = max(
        (
            (line["tokens_per_s"], line["peer"])
            for line in _peer_levels(peer_rows)
            if line["concurrency"] == TARGET_CONCURRENCY and "tokens_per_s" in line
        ),
        default=None,
    )
    mine = ours.get(TARGET_CONCURRENCY)
    ratio = mine["tokens_per_s"] / best[0] if mine and best else None
    out.append(
        {
            "target": f"tokens/s at c={TARGET_CONCURRENCY} vs best transformers"
            + (f" ({best[1]})" if best else ""),
            "measured": ratio,
            "bound": f">= {SPEEDUP_VS_PEERS}x",
            "met": None if ratio is None else ratio >= SPEEDUP_VS_PEERS,
        }
    )
    one = ours.get(1)
    floor_ms = floor.get("floor_ms") if floor else None
    itl = one["itl_s"]["p50"] * 1e3 if one else None
    ratio = itl / floor_ms if itl is not None and floor_ms else None
    out.append(
        {
            "target": "c=1 inter-token p50 vs floor"
            + (f" ({floor_ms:.3f} ms)" if floor_ms else ""),
            "measured": ratio,
            "bound": f"<= {FLOOR_SLACK}x",
            "met": None if ratio is None else ratio <= FLOOR_SLACK,
        }
    )
    out.append(
        {
            "target": f"prefix hit TTFT vs miss ({prefix['prefix_tokens']}-token prefix)",
            "measured": prefix["speedup"],
            "bound": f">= {PREFIX_SPEEDUP}x lower",
            "met": prefix["speedup"] >= PREFIX_SPEEDUP,
        }
    )
    errors = sum(r["errors"] for r in rows) + prefix["errors"]
    fives = sum(r["errors_5xx"] for r in rows) + prefix["errors_5xx"]
    out.append(
        {
            "target": "errors / 5xx over the run",
            "measured": f"{errors} / {fives}",
            "bound": "0 / 0",
            "met": errors == 0 and fives == 0,
        }
    )
    return out


def _target_table(targets: list[dict[str, Any]]) -> Table:
    table = Table(("target", "measured", "bound", "met"), title="Targets")
    for t in targets:
        m = t["measured"]
        shown = f"{m:.2f}x" if isinstance(m, float) else ("not measured" if m is None else m)
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else "NO")
        table.rows.append((t["target"], shown, t["bound"], met))
    return table


def report_parts(
    info: dict[str, Any],
    rows: list[dict[str, Any]],
    prefix: dict[str, Any],
    floor: dict[str, Any] | None,
    peer_rows: list[dict[str, Any]],
    config: dict[str, Any],
) -> tuple[list[Table], list[str], list[str], list[dict[str, Any]]]:
    """(tables, paragraphs above them, notes below them, target checks)."""
    cfg, params, engine = info["config"], info["params"], info["engine"]
    moe = cfg["moe"]
    weights = "random init (--random-init)" if config["random_init"] else "as saved"
    text = [
        f"Model: `{config['ckpt']}` ({config['shape'] if config['random_init'] else 'given'}), "
        f"d_model {cfg['d_model']}, {cfg['n_layers']} layers, {cfg['n_heads']}/"
        f"{cfg.get('n_kv_heads') or cfg['n_heads']} heads, {moe['n_experts']} experts of "
        f"{moe['d_hidden']} top-{moe['k']}, vocabulary {cfg['vocab_size']}, "
        f"{params['total']:,} parameters ({params['active']:,} active), {info.get('dtype')}; "
        f"weights {weights}.",
        f"Each request: {config['prompt_len']} random prompt tokens, {config['max_new_tokens']} "
        f"greedy tokens, streamed. Engine: decode {engine['decode']['mode']} (graphs for "
        f"{engine['decode']['graphs'] or 'none'}"
        + (f"; {engine['decode']['fallback']}" if engine["decode"]["fallback"] else "")
        + f"), {engine['kv']['pages']} KV pages of {engine['kv']['page_size']}, "
        f"prefill chunk {engine['prefill_chunk']}, max batch {engine['effective_max_batch']}.",
    ]
    for p in peer_rows:
        check = next((line["check"] for line in p["lines"] if "check" in line), None)
        if check:
            text.append(
                f"transformers `{p['peer']}` holds the same weights: logits relative error "
                f"{check['relative_error']:.2e}, top-1 agreement {check['top1_agreement']:.3f} "
                "on a 128-token prompt."
            )
    notes = [
        f"Prefix cache: median TTFT of 8 requests with a {prefix['prefix_tokens']}-token prompt: "
        f"miss {_ms(prefix['cold_ttft_s'])} ms, hit {_ms(prefix['warm_ttft_s'])} ms "
        f"({prefix['speedup']:.1f}x)."
    ]
    if floor and "floor_ms" in floor:
        notes.append(
            f"c=1 floor, CUDA-graph replays at B=1 with {floor['context']} positions of context: "
            f"{floor['layers']} x (MoE layer {floor['moe_layer_ms']:.3f} ms + attention "
            f"{floor['attention_ms']:.3f} ms) + embedding/head/sampling "
            f"{floor['embed_head_sample_ms']:.3f} ms = {floor['floor_ms']:.3f} ms; the engine's "
            f"own B=1 decode graph replays in {floor['engine_step_ms']:.3f} ms."
        )
    elif floor:
        notes.append(f"c=1 floor not measured: {floor.get('error')}")
    targets = check_targets(rows, prefix, floor, peer_rows)
    tables = [_moekit_table(rows)]
    if peer_rows:
        tables.append(_peer_table(peer_rows))
    tables.append(_target_table(targets))
    return tables, text, notes, targets
