"""Prometheus metrics for one app, in its own CollectorRegistry (never the process-global one).

Request counts come from an ASGI middleware that sees every response's status; token counts and latencies are
recorded by the API as requests finish; engine gauges are read from `stats()` at scrape time.
"""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

# engine.stats() key -> (metric name, help)
ENGINE_GAUGES = {
    "num_running": ("peftserve_num_requests_running", "Requests in the running batch"),
    "num_waiting": ("peftserve_num_requests_waiting", "Requests waiting to be scheduled"),
    "kv_blocks_used": ("peftserve_kv_blocks_used", "KV cache blocks in use"),
    "kv_blocks_total": ("peftserve_kv_blocks_total", "KV cache blocks in all"),
}


class ServerMetrics:
    def __init__(self, stats: Callable[[], dict], known_paths: set[str] | None = None):
        """`stats` returns the engine's stats dict; `known_paths` bounds the `endpoint` label's values."""
        self.registry = CollectorRegistry()
        self.known_paths = known_paths or set()
        self.requests = Counter("peftserve_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=self.registry)
        self.prompt_tokens = Counter("peftserve_prompt_tokens", "Prompt tokens of finished requests",
                                     registry=self.registry)
        self.generation_tokens = Counter("peftserve_generation_tokens", "Generated tokens of finished requests",
                                         registry=self.registry)
        self.time_to_first_token = Histogram("peftserve_time_to_first_token_seconds",
                                             "Time from request arrival to its first generated token",
                                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.e2e_latency = Histogram("peftserve_e2e_request_latency_seconds",
                                     "Time from request arrival to its last generated token",
                                     buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_EngineGauges(stats))

    def observe_finished(self, num_prompt_tokens: int, num_output_tokens: int, seconds: float) -> None:
        self.prompt_tokens.inc(num_prompt_tokens)
        self.generation_tokens.inc(num_output_tokens)
        self.e2e_latency.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def endpoint_label(self, path: str) -> str:
        return path if path in self.known_paths else "other"


class _EngineGauges:
    """A collector: engine stats become gauges when scraped."""

    def __init__(self, stats: Callable[[], dict]):
        self.stats = stats

    def collect(self):
        stats = self.stats()
        for key, (name, doc) in ENGINE_GAUGES.items():
            if key in stats:
                yield GaugeMetricFamily(name, doc, value=stats[key])
        if stats.get("kv_blocks_total"):
            yield GaugeMetricFamily("peftserve_kv_cache_usage_ratio", "Fraction of KV cache blocks in use",
                                    value=stats.get("kv_blocks_used", 0) / stats["kv_blocks_total"])


class RequestCounter:
    """ASGI middleware: counts each HTTP response by endpoint and status (streaming-safe: it only wraps send)."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = self.metrics.endpoint_label(scope["path"])
        counted = False

        async def counting_send(message):
            nonlocal counted
            if message["type"] == "http.response.start" and not counted:
                counted = True
                self.metrics.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            if not counted:             # the app raised; the server's error middleware answers 500
                self.metrics.requests.labels(endpoint, "500").inc()
