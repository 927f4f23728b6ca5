"""What the engine reports about itself: one dict of counters and gauges, read by /metrics
(server/engine_metrics.py) and /health."""
from __future__ import annotations


def engine_stats(engine, include_adapters: bool = True) -> dict:
    """The engine's counters and gauges (what /metrics and /health report), read on the engine thread. Without
    `include_adapters` only what `step_stats` reads: the adapter registry's gauges take ~2 us per registered
    adapter (bench/stats_cost.py), so the serving loop reads them after commands, when it goes idle, and at most
    every AsyncEngine.ADAPTER_STATS_EVERY_S while it steps (server/async_engine.py)."""
    stats = step_stats(engine)
    if include_adapters:
        stats.update(adapter_stats(engine))
    return stats


def step_stats(engine) -> dict:
    """What changes with every step: requests, KV blocks, step counters, the running / waiting adapters (time in
    the number of requests)."""
    blocks = engine.scheduler.blocks
    return {
        "num_running": len(engine.scheduler.running),
        "num_waiting": engine.scheduler.num_waiting,
        "kv_blocks_used": blocks.num_used,
        "kv_blocks_total": blocks.num_blocks,
        "num_preemptions": engine.num_preemptions,
        "num_prefill_tokens": engine.num_prefill_tokens,
        **engine.step_counts,
        "kv_blocks_cached_free": blocks.num_cached_free,
        "prefix_cache_queries": blocks.cache.num_queried_tokens if blocks.cache is not None else 0,
        "prefix_cache_hits": blocks.cache.num_hit_tokens if blocks.cache is not None else 0,
        "num_adapters": len(engine.adapters.handles),
        # vLLM's lora_requests_info: adapter names of running / waiting requests, first seen first
        "running_adapters": _adapter_names(engine.scheduler.running),
        "waiting_adapters": _adapter_names(engine.scheduler.waiting),
        "max_loras": engine.config.max_loras,
    }


def adapter_stats(engine) -> dict:
    """The adapter registry's gauges and counters (time in the number of registered adapters)."""
    return {
        "adapter_device_bytes": engine.adapters.device_bytes,
        "adapter_tiers": engine.adapters.tier_usage(),       # tier -> (adapters, bytes)
        "adapter_usage": engine.adapters.usage(),
    }


def _adapter_names(seqs) -> list[str]:
    return list(dict.fromkeys(seq.adapter.name for seq in seqs if seq.adapter is not None))
