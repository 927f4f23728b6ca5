"""The engine's state as Prometheus metrics, read from `stats()` when scraped: our own names, and the vLLM names
that adapter-aware routers read (the Gateway API Inference Extension's endpoint picker scrapes
`vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc` and `vllm:lora_requests_info`).

`vllm:lora_requests_info` is exactly vLLM's: a gauge whose value is the current Unix time and whose labels carry
the state, adapter names comma-joined without spaces in the order their requests were first seen, e.g.
    vllm:lora_requests_info{max_lora="64",running_lora_adapters="shout,json",waiting_lora_adapters=""} 1.7e+09
(vLLM keeps every label set it ever reported, each with the time it last did, and routers take the newest;
we report only the current one, which is what that newest sample says.)
"""
from __future__ import annotations

import time
from typing import Callable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# stats key -> (metric name, help)
GAUGES = {
    "num_running": ("peftserve_num_requests_running", "Requests in the running batch"),
    "num_waiting": ("peftserve_num_requests_waiting", "Requests waiting to be scheduled"),
    "kv_blocks_used": ("peftserve_kv_blocks_used", "KV cache blocks in use"),
    "kv_blocks_total": ("peftserve_kv_blocks_total", "KV cache blocks in all"),
}
# stats key -> (counter name without _total, help): the engine's model steps
STEP_COUNTERS = {
    "num_steps": ("peftserve_engine_steps", "Model steps (forward + sampling) the engine ran"),
    "step_seconds": ("peftserve_engine_step_seconds", "Seconds the engine spent in model steps"),
    "step_tokens": ("peftserve_engine_step_tokens", "Tokens run in model steps (prefill chunks + decodes)"),
    "step_seqs": ("peftserve_engine_step_sequences", "Sequences run in model steps, summed over steps"),
    "prefix_cache_queries": ("peftserve_prefix_cache_queries", "Tokens of admitted requests looked up in the "
                                                               "prefix cache"),
    "prefix_cache_hits": ("peftserve_prefix_cache_hits", "Tokens of admitted requests found in the prefix cache"),
}
# stats["adapter_usage"] key -> (counter name without _total, help, labels)
ADAPTER_COUNTERS = {
    "num_installs": ("peftserve_adapter_installs", "Adapter copies onto the device (host -> device)", {}),
    "num_evictions": ("peftserve_adapter_evictions", "Adapters evicted, by destination tier", {"to": "host"}),
    "num_host_evictions": ("peftserve_adapter_evictions", "Adapters evicted, by destination tier", {"to": "disk"}),
    "num_reloads": ("peftserve_adapter_reloads", "Adapter checkpoints re-read from disk (disk -> host)", {}),
}


class EngineCollector:
    """A prometheus_client collector over `stats()` (AsyncEngine.stats: safe from any thread)."""

    def __init__(self, stats: Callable[[], dict], model_name: str):
        self.stats = stats
        self.model_name = model_name

    def collect(self):
        stats = self.stats()
        yield from self._own(stats)
        yield from self._vllm(stats)

    def _own(self, stats: dict):
        for key, (name, doc) in GAUGES.items():
            if key in stats:
                yield GaugeMetricFamily(name, doc, value=stats[key])
        if "kv_blocks_total" in stats:
            yield GaugeMetricFamily("peftserve_kv_cache_usage_ratio", "Fraction of KV cache blocks in use",
                                    value=kv_usage(stats))
        if "num_preemptions" in stats:
            yield CounterMetricFamily("peftserve_preemptions", "Sequences preempted for lack of KV blocks",
                                      value=stats["num_preemptions"])
        if "num_prefill_tokens" in stats:
            yield CounterMetricFamily("peftserve_prefill_tokens", "Prompt tokens run through the model (once per "
                                      "prompt for its n samples; again after a preemption)",
                                      value=stats["num_prefill_tokens"])
        for key, (name, doc) in STEP_COUNTERS.items():
            if key in stats:
                yield CounterMetricFamily(name, doc, value=stats[key])
        tiers = stats.get("adapter_tiers")
        if tiers:
            count = GaugeMetricFamily("peftserve_adapters", "Loaded adapters by tier", labels=["tier"])
            size = GaugeMetricFamily("peftserve_adapter_bytes", "Bytes of loaded adapters by tier",
                                     labels=["tier"])
            for tier, (num, num_bytes) in tiers.items():
                count.add_metric([tier], num)
                size.add_metric([tier], num_bytes)
            yield count
            yield size
        usage = stats.get("adapter_usage")
        if usage:
            families: dict[str, CounterMetricFamily] = {}
            for key, (name, doc, labels) in ADAPTER_COUNTERS.items():
                family = families.setdefault(name, CounterMetricFamily(name, doc, labels=list(labels)))
                family.add_metric(list(labels.values()), usage.get(key, 0))
            yield from families.values()

    def _vllm(self, stats: dict):
        labels = ["model_name"]
        for key, name, doc in (("num_running", "vllm:num_requests_running", "Number of requests in model "
                                "execution batches."),
                               ("num_waiting", "vllm:num_requests_waiting", "Number of requests waiting to be "
                                "processed.")):
            if key in stats:
                family = GaugeMetricFamily(name, doc, labels=labels)
                family.add_metric([self.model_name], stats[key])
                yield family
        if "kv_blocks_total" in stats:
            family = GaugeMetricFamily("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                                       labels=labels)
            family.add_metric([self.model_name], kv_usage(stats))
            yield family
        for key, name, doc in (("prefix_cache_queries", "vllm:prefix_cache_queries", "Prefix cache queries, in "
                                "terms of number of queried tokens."),
                               ("prefix_cache_hits", "vllm:prefix_cache_hits", "Prefix cache hits, in terms of "
                                "number of cached tokens.")):
            if key in stats:
                family = CounterMetricFamily(name, doc, labels=labels)
                family.add_metric([self.model_name], stats[key])
                yield family
        if "max_loras" in stats:
            family = GaugeMetricFamily("vllm:lora_requests_info", "Running stats on lora requests.",
                                       labels=["max_lora", "waiting_lora_adapters", "running_lora_adapters"])
            family.add_metric([str(stats["max_loras"]), ",".join(stats.get("waiting_adapters", ())),
                               ",".join(stats.get("running_adapters", ()))], time.time())
            yield family


def kv_usage(stats: dict) -> float:
    total = stats.get("kv_blocks_total") or 0
    return stats.get("kv_blocks_used", 0) / total if total else 0.0
