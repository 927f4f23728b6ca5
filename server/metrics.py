"""Prometheus metrics for one app, in its own CollectorRegistry (never the process-global one).

Request counts come from an ASGI middleware that sees every response's status; per-request counts and latencies
are recorded by the API as requests finish (label `adapter`: the adapter's name, "" for the base model);
adapter reads are observed by the registry's read hook; engine gauges are read from `stats()` at scrape time
(server/engine_metrics.py, with vLLM's names for routers).
"""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from server.engine_metrics import EngineCollector

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
BASE_LABEL = ""                  # the `adapter` label of base-model requests


class ServerMetrics:
    def __init__(self, stats: Callable[[], dict], known_paths: set[str] | None = None, model_name: str = ""):
        """`stats` returns the engine's stats dict; `known_paths` bounds the `endpoint` label's values;
        `model_name` is the vLLM gauges' `model_name` label."""
        self.registry = CollectorRegistry()
        self.known_paths = known_paths or set()
        r = self.registry
        self.requests = Counter("peftserve_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.finished = Counter("peftserve_adapter_requests", "Generation requests finished, by adapter",
                                ["adapter"], registry=r)
        self.prompt_tokens = Counter("peftserve_prompt_tokens", "Prompt tokens of finished requests, by adapter",
                                     ["adapter"], registry=r)
        self.generation_tokens = Counter("peftserve_generation_tokens",
                                         "Generated tokens of finished requests, by adapter", ["adapter"], registry=r)
        self.time_to_first_token = Histogram("peftserve_time_to_first_token_seconds",
                                             "Time from request arrival to its first generated token",
                                             buckets=LATENCY_BUCKETS, registry=r)
        self.time_per_output_token = Histogram("peftserve_time_per_output_token_seconds",
                                               "Per request with 2+ tokens: (last token - first token) time / "
                                               "(tokens - 1)", buckets=TOKEN_LATENCY_BUCKETS, registry=r)
        self.e2e_latency = Histogram("peftserve_e2e_request_latency_seconds",
                                     "Time from request arrival to its last generated token",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("peftserve_request_queue_time_seconds",
                                    "Time from arrival at the engine to the request's first scheduled step",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.adapter_loads = Counter("peftserve_adapter_loads", "Adapter checkpoint reads (loads, just-in-time "
                                     "loads, disk -> host re-reads), by result", ["result"], registry=r)
        self.adapter_load_time = Histogram("peftserve_adapter_load_seconds",
                                           "Time to read and validate an adapter checkpoint",
                                           buckets=LATENCY_BUCKETS, registry=r)
        r.register(EngineCollector(stats, model_name))

    def observe_finished(self, adapter: str | None, num_prompt_tokens: int, num_output_tokens: int,
                         e2e_seconds: float, first_to_last_seconds: float | None,
                         queue_seconds: float | None) -> None:
        label = BASE_LABEL if adapter is None else adapter
        self.finished.labels(label).inc()
        self.prompt_tokens.labels(label).inc(num_prompt_tokens)
        self.generation_tokens.labels(label).inc(num_output_tokens)
        self.e2e_latency.observe(e2e_seconds)
        if first_to_last_seconds is not None and num_output_tokens > 1:
            self.time_per_output_token.observe(first_to_last_seconds / (num_output_tokens - 1))
        if queue_seconds is not None:
            self.queue_time.observe(queue_seconds)

    def observe_adapter_read(self, seconds: float, ok: bool) -> None:
        """The adapter registry's read hook (called on loader threads; prometheus_client is thread-safe)."""
        self.adapter_loads.labels("ok" if ok else "error").inc()
        if ok:
            self.adapter_load_time.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def endpoint_label(self, path: str) -> str:
        return path if path in self.known_paths else "other"


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
