"""What the serving loop's stats cost per step against the number of registered adapters.

    python -m bench.stats_cost [--adapters 8 64 512] [--calls 200]

The AsyncEngine publishes the engine's stats after every step (server/async_engine.py). The adapter registry's
part (device bytes, per-tier counts and bytes, usage counters) walks every registered adapter; the rest (requests,
KV blocks, step counters, the running / waiting adapters) does not. Here: the 160M benchmark Llama with N copies of
one rank-1 q_proj LoRA registered (host tier, none on the device), and the median time of `engine.stats()` with
and without the registry's part.
"""
from __future__ import annotations

import argparse
import statistics
import time

from bench.common import CACHE, emit, llama_160m, machine


def timed(fn, calls: int) -> float:
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", nargs="+", type=int, default=[8, 64, 512])
    ap.add_argument("--calls", type=int, default=200)
    args = ap.parse_args()
    from peft import LoraConfig

    from server.config import EngineConfig
    from server.engine import LLMEngine
    from tests.peft_fixtures import save_adapter
    base = llama_160m("float32")
    lora = CACHE / "stats-cost-lora"
    if not (lora / "adapter_config.json").exists():
        save_adapter(base, LoraConfig(r=1, lora_alpha=2, target_modules=["q_proj"]), lora, seed=0)
    engine = LLMEngine(EngineConfig(model=str(base), dtype="float32", max_num_seqs=8, kv_cache_memory="256MiB",
                                    max_loras=8, max_host_adapter_memory=None))
    rows, loaded = [], 0
    for n in sorted(args.adapters):
        for i in range(loaded, n):
            engine.adapters.load(f"a{i:05d}", str(lora))
        loaded = n
        full = timed(lambda: engine.stats(), args.calls)
        per_step = timed(lambda: engine.stats(include_adapters=False), args.calls)
        row = dict(adapters=n, stats_ms=full * 1e3, step_stats_ms=per_step * 1e3)
        emit(row)
        rows.append(row)
    print(f"\nmachine: {machine()}; median of {args.calls} calls\n")
    print("| registered adapters | engine.stats() ms | without the registry's part ms |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['adapters']} | {r['stats_ms']:.3f} | {r['step_stats_ms']:.3f} |")


if __name__ == "__main__":
    main()
