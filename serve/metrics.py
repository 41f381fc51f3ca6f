"""Prometheus metrics for `GET /metrics`, in a registry of the app's own (no process globals).

Counted as they happen: requests by route and status, stage latencies (a histogram per stage).
Read at scrape time from the queue and the loaded Engine: queue depth, jobs done, peak memory,
adapter-cache hits/misses/evictions/bytes/entries, sessions created, adapter switches served by
binding (no session) and by creating a session.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

STAGE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    def __init__(self, jobs, models):
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("sdc_requests", "HTTP requests answered", ["route", "status"],
                                registry=self.registry)
        self.stage_seconds = Histogram("sdc_stage_seconds", "Seconds per stage per request "
                                       "(session creation included)", ["stage"],
                                       buckets=STAGE_BUCKETS, registry=self.registry)
        self.registry.register(_Live(jobs, models))

    def observe(self, result) -> None:
        for stage, seconds in result.timings.items():
            self.stage_seconds.labels(stage).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Live:
    """Values read when scraped."""

    def __init__(self, jobs, models):
        self.jobs, self.models = jobs, models

    def collect(self):
        yield GaugeMetricFamily("sdc_queue_depth", "Jobs waiting or running", value=self.jobs.depth)
        yield CounterMetricFamily("sdc_jobs", "Jobs finished", value=self.jobs.done)
        engine = self.models.engine
        if engine is None:
            return
        s, cache = engine.stats, engine.adapters
        yield GaugeMetricFamily("sdc_peak_memory_bytes", "Largest per-request peak above the "
                                "baseline (RSS on CPU)", value=s.peak_bytes)
        yield CounterMetricFamily("sdc_images", "Images generated", value=s.images)
        yield CounterMetricFamily("sdc_sessions_created", "onnxruntime sessions created",
                                  value=s.sessions_created)
        yield CounterMetricFamily("sdc_adapter_binds", "Stage sessions given an adapter's "
                                  "weights by binding its slots (no session created)",
                                  value=s.adapter_binds)
        yield CounterMetricFamily("sdc_adapter_sessions", "Stage sessions created for an "
                                  "adapter's weights outside the slots", value=s.adapter_sessions)
        yield CounterMetricFamily("sdc_adapter_fuse_seconds", "Seconds spent fusing adapters "
                                  "(cache misses)", value=cache.stats.fuse_seconds)
        yield CounterMetricFamily("sdc_adapter_cache_hits", "Adapter-cache hits",
                                  value=cache.stats.hits)
        yield CounterMetricFamily("sdc_adapter_cache_misses", "Adapter-cache misses (fusions)",
                                  value=cache.stats.misses)
        yield CounterMetricFamily("sdc_adapter_cache_evictions", "Adapter-cache evictions",
                                  value=cache.stats.evictions)
        yield GaugeMetricFamily("sdc_adapter_cache_bytes", "Bytes of fused weights cached",
                                value=cache.bytes)
        yield GaugeMetricFamily("sdc_adapter_cache_entries", "Adapter sets cached",
                                value=len(cache.entries))
        yield GaugeMetricFamily("sdc_adapter_cache_limit_bytes", "--lora-cache", value=cache.limit)
