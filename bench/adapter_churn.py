"""Adapter churn: how long an adapter takes to load (cold from disk, warm from the host tier) and the throughput of
requests cycling through more adapters than the device tier holds.

    python -m bench.adapter_churn [--adapters 32] [--device-adapters 8] [--requests 64] [--rank 16]
                                  [--prompt-len 32] [--output-len 32] [--repeats 3] [--device cpu]

160M random Llama (bench/common.py), rank-16 all-linear LoRA adapters made by peft (bench/multi_lora.py).
Points (one JSON line each, then a table):
  load cold      read + validate + fold (loader thread work in serving) + install, from the safetensors file
  swap warm      host -> device with the device full: evict the LRU adapter, install this one (engine thread)
  throughput     --requests requests at once, request i for adapter i % --adapters, greedy, ignore_eos:
                   all resident     every adapter on the device (no budget)
                   device K + host  device budget of K adapters, the others on the host tier
                   device K + disk  the same with no host tier: every swap re-reads a file (on a loader thread)
Small check run: python -m bench.adapter_churn --adapters 4 --device-adapters 2 --requests 8 --output-len 4
"""
from __future__ import annotations

import argparse
import itertools
import statistics

from bench.common import Timer, emit, llama_160m, machine, random_prompts
from bench.multi_lora import make_adapters
from server.config import EngineConfig
from server.engine import LLMEngine
from server.sampling import SamplingParams

_ids = itertools.count()


def reset(engine, paths, max_device_bytes, max_host_bytes) -> list[float]:
    """Unload everything, set the budgets, load every adapter again; the cold load time of each (seconds)."""
    registry = engine.adapters
    for name in registry.names():
        registry.unload(name)
    registry.max_device_bytes, registry.max_host_bytes = max_device_bytes, max_host_bytes
    seconds = []
    for i, path in enumerate(paths):
        with Timer() as t:
            registry.load(f"a{i:03d}", path)
        seconds.append(t.seconds)
    return seconds


def warm_swaps(engine, num_adapters: int, repeats: int) -> list[float]:
    """Seconds of make_resident for host-tier adapters while the device is full of idle ones."""
    registry = engine.adapters
    seconds = []
    for _ in range(repeats):
        for i in range(num_adapters):
            handle = registry.get(f"a{i:03d}")
            if handle.slot is not None:
                continue
            with Timer() as t:
                assert registry.make_resident(handle, busy=set())
            seconds.append(t.seconds)
    return seconds


def throughput(engine, prompts, num_adapters: int, output_len: int) -> tuple[float, int, int]:
    """Generated tokens per second, and the installs and disk reads it took."""
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    names = [f"a{i % num_adapters:03d}" for i in range(len(prompts))]
    registry = engine.adapters
    installs, reloads = registry.num_installs, registry.num_reloads
    for prompt, name in zip(prompts, names):
        engine.add_request(f"churn-{next(_ids)}", prompt, params, name)
    n_out = 0
    with Timer() as t:
        while engine.has_unfinished():
            n_out += sum(len(o.token_ids) for o in engine.step())
    return n_out / t.seconds, registry.num_installs - installs, registry.num_reloads - reloads


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, default=32)
    ap.add_argument("--device-adapters", type=int, default=8, help="device tier budget, in adapters")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    n, k = args.adapters, args.device_adapters
    if not 0 < k < n:
        ap.error("need 0 < --device-adapters < --adapters")
    base = llama_160m("float32")
    paths = make_adapters(base, n, args.rank)
    engine = LLMEngine(EngineConfig(model=str(base), dtype="float32", max_num_seqs=args.requests,
                                    max_num_batched_tokens=4096, kv_cache_memory="2GiB", max_loras=n,
                                    device=args.device))
    prompts = random_prompts(args.requests, args.prompt_len)
    size = engine.adapters.read(paths[0]).num_bytes
    device_budget = k * size

    reset(engine, paths, None, None)                              # warm up: file cache, stacks grown to n slots
    throughput(engine, prompts[:8], min(n, 8), 4)
    rows = []

    def point(case, **values):
        row = dict(case=case, **values)
        emit(row)
        rows.append(row)

    cold = [s for _ in range(args.repeats) for s in reset(engine, paths, device_budget, None)]
    point("load cold (read + validate + fold + install)", ms=1e3 * statistics.median(cold), samples=len(cold))
    warm = warm_swaps(engine, n, args.repeats)
    point("swap warm (evict LRU + install from host)", ms=1e3 * statistics.median(warm), samples=len(warm))

    for case, device_bytes, host_bytes in (("all resident", None, None),
                                          (f"device {k} + host {n - k}", device_budget, None),
                                          (f"device {k} + disk {n - k}", device_budget, 0)):
        reset(engine, paths, device_bytes, host_bytes)
        results = [throughput(engine, prompts, n, args.output_len) for _ in range(args.repeats)]
        point(f"throughput, {case}", tok_s=statistics.median(r[0] for r in results),
              installs=statistics.median(r[1] for r in results), reads=statistics.median(r[2] for r in results))

    print(f"\nmachine: {machine()}; {n} rank-{args.rank} all-linear adapters of {size / 1e6:.1f} MB, device tier "
          f"{k} adapters; {args.requests} requests x {args.prompt_len} prompt + {args.output_len} output tokens\n")
    print("| case | result | installs / disk reads per run |")
    print("|---|---|---|")
    for r in rows:
        result = f"{r['ms']:.1f} ms (median of {r['samples']})" if "ms" in r else f"{r['tok_s']:.0f} tok/s"
        churn = f"{r['installs']:g} / {r['reads']:g}" if "installs" in r else ""
        print(f"| {r['case']} | {result} | {churn} |")


if __name__ == "__main__":
    main()
