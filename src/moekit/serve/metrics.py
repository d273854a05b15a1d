"""Prometheus view of `ServeStats`, read at scrape time into the app's own registry."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from moekit.serve.engine import Engine
from moekit.serve.stats import Histogram


def _histogram(name: str, doc: str, h: Histogram) -> HistogramMetricFamily:
    buckets = [(str(b), c) for b, c in zip(h.bounds, h.counts, strict=True)]
    buckets.append(("+Inf", h.n))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=h.total)


class EngineCollector(Collector):
    """Counters, gauges and histograms of one engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        s, r = self.engine.stats, self.engine.report()
        done = CounterMetricFamily(
            "moekit_requests", "Requests finished, by reason", labels=["reason"]
        )
        for reason, n in sorted(s.finished.items()):
            done.add_metric([reason], n)
        yield done
        yield CounterMetricFamily("moekit_requests_rejected", "Requests refused (429)", s.rejected)
        yield CounterMetricFamily("moekit_prompt_tokens", "Prompt positions", s.prompt_tokens)
        yield CounterMetricFamily(
            "moekit_generated_tokens", "Generated positions", s.generated_tokens
        )
        yield GaugeMetricFamily("moekit_queue_depth", "Requests waiting", r["queue_depth"])
        yield GaugeMetricFamily(
            "moekit_active_sequences", "Sequences decoding", r["requests"]["active"]
        )
        yield GaugeMetricFamily(
            "moekit_tokens_per_second", "Generated tokens/s over 10 s", r["tokens_per_s"]
        )
        yield CounterMetricFamily(
            "moekit_prefill_tokens", "Prompt positions fed (not reused)", s.prefill_tokens
        )
        occupancy = r["batch"]["occupancy"]
        yield GaugeMetricFamily(
            "moekit_batch_occupancy", "Decode batch / max_batch, latest step", occupancy["last"]
        )
        yield GaugeMetricFamily(
            "moekit_batch_occupancy_mean", "Decode batch / max_batch, mean", occupancy["mean"]
        )
        kv = r["kv"]
        yield GaugeMetricFamily("moekit_kv_pages", "KV pages in all", kv["pages"])
        used = GaugeMetricFamily("moekit_kv_pages_used", "KV pages by state", labels=["state"])
        for state in ("held", "cached", "free", "reserved"):
            used.add_metric([state], kv[state])
        yield used
        yield GaugeMetricFamily(
            "moekit_kv_usage",
            "Fraction of KV pages held by running sequences",
            kv["held"] / kv["pages"],
        )
        if (pc := r["prefix_cache"]) is not None:
            yield CounterMetricFamily("moekit_prefix_cache_lookups", "Lookups", pc["lookups"])
            yield CounterMetricFamily("moekit_prefix_cache_hits", "Hits", pc["hits"])
            yield CounterMetricFamily(
                "moekit_prefix_cache_reused_tokens", "Prompt positions reused", pc["tokens_reused"]
            )
            yield GaugeMetricFamily(
                "moekit_prefix_cache_tokens",
                "Positions kept by unused cached pages",
                kv["cached"] * kv["page_size"],
            )
        load = CounterMetricFamily(
            "moekit_expert_tokens", "Token-slots routed to each expert", labels=["layer", "expert"]
        )
        for row in r["expert_load"]:
            for j, n in enumerate(row["tokens"]):
                load.add_metric([str(row["layer"]), str(j)], n)
        yield load
        yield _histogram("moekit_request_latency_seconds", "Submit to last output", s.latency)
        yield _histogram("moekit_time_to_first_token_seconds", "Submit to first output", s.ttft)
        yield _histogram("moekit_inter_token_latency_seconds", "Between two outputs", s.itl)


def build_registry(engine: Engine) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(EngineCollector(engine))
    return registry
