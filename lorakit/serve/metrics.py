"""`GET /metrics`: the server's counters and the engine's state in Prometheus' text format (prometheus_client).

HTTP-side figures (requests, generated tokens, time to first token) are counted as they happen; the
engine's state (queue depth, running requests, adapters per tier, adapter reads and evictions) is read
from the engine at scrape time, so it is never stale. Each server has its own registry.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ENDPOINTS = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/load_lora_adapter",
             "/v1/unload_lora_adapter", "/health", "/metrics")


class EngineCollector:
    """The engine's state as gauges and counters, read when scraped."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Any]:
        """Yield the metric families (prometheus_client's collector protocol)."""
        engine, cache = self.engine, self.engine.cache
        gauges = {
            "lorakit_queue_depth": ("requests waiting for a slot", len(engine.waiting)),
            "lorakit_running_requests": ("sequences in the running batch", len(engine.running)),
            "lorakit_adapters_registered": ("adapters new requests may name", len(cache.servable())),
            "lorakit_adapters_in_memory": ("adapters held in memory (max_cpu_loras bounds it)", len(cache.loaded)),
            "lorakit_adapters_resident": ("adapters in the compute tables (max_loras bounds it)", len(cache.slots)),
        }
        for name, (help_text, value) in gauges.items():
            yield GaugeMetricFamily(name, help_text, value=value)
        yield CounterMetricFamily("lorakit_adapter_loads", "adapter folders read from disk", value=cache.reads)
        evictions = CounterMetricFamily("lorakit_adapter_evictions", "adapters evicted, per tier", labels=["tier"])
        for tier, count in cache.evictions.items():
            evictions.add_metric([tier], count)
        yield evictions


class Metrics:
    """One server's metrics."""

    def __init__(self, engine: Any) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("lorakit_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=self.registry)
        self.tokens = Counter("lorakit_generated_tokens", "tokens generated", registry=self.registry)
        self.ttft = Histogram("lorakit_time_to_first_token_seconds", "time from a request's arrival to its first "
                              "token", buckets=TTFT_BUCKETS, registry=self.registry)
        self.registry.register(EngineCollector(engine))

    def count(self, path: str, status: int) -> None:
        """Count one HTTP request (paths outside the API count as "other", so the labels stay few)."""
        self.requests.labels(path if path in ENDPOINTS else "other", str(status)).inc()

    def text(self) -> bytes:
        """The exposition text."""
        return generate_latest(self.registry)
