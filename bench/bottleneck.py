"""AdapterHub bottleneck adapters: throughput with 8 distinct adapters of each kind vs the base model in one batch,
and AdapterDrop k vs latency.

    python -m bench.bottleneck [--requests 32] [--prompt-len 32] [--output-len 32] [--rounds 3] [--bytes-only]

160M random Llama (bench/common.py, hidden 1024, 8 layers); adapters in AdapterHub's format with random weights
(bench/adapterhub_adapters.py): Pfeiffer (SeqBnConfig, r 64 after each MLP), Houlsby (DoubleSeqBnConfig, r 64
after attention and MLP), parallel (ParBnConfig, r 512, scaling 4) and AdapterHub (IA)^3. Every case runs the same
requests (n greedy requests, request i on adapter i % 8); rounds interleave the cases so a slow spell of this
shared machine hits them alike; the median is kept. Prints one JSON line per point and a markdown table.
Next to each case: the weight bytes a decode step reads (the base's linears once, plus every distinct adapter of
the case once, in the layers it acts in) and base bytes / that, the case's throughput bound relative to the base
when a decode step is bound by reading weights (`--bytes-only`: that column alone, no timing).
"""
from __future__ import annotations

import argparse
import statistics

from bench import adapterhub_adapters
from bench.common import Timer, emit, llama_160m, machine, random_prompts
from server.config import EngineConfig
from server.engine import LLMEngine
from server.sampling import SamplingParams

HIDDEN, LAYERS = 1024, 8
WIDTHS = {"k_proj": 512, "v_proj": 512, "down_proj": 1024}
KINDS = ["pfeiffer", "houlsby", "parallel", "ia3"]


def run(engine, prompts, names, output_len, drop=None) -> tuple[float, float]:
    """All requests at once; returns (output tokens per second, mean seconds per decode step)."""
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    for i, (prompt, name) in enumerate(zip(prompts, names)):
        engine.add_request(f"q{i}", prompt, params, name, adapter_drop=drop if name else None)
    n_out, steps, decode_seconds = 0, 0, 0.0
    with Timer() as t:
        while engine.has_unfinished():
            with Timer() as step:
                outs = engine.step()
            n_out += sum(len(o.token_ids) for o in outs)
            if steps:                           # step 0 is the prefill
                decode_seconds += step.seconds
            steps += 1
    return n_out / t.seconds, decode_seconds / max(steps - 1, 1)


def linear_bytes(engine) -> int:
    seen, total = set(), 0
    for linear in engine.runner.model.linears():
        if linear.weight.data_ptr() not in seen:
            seen.add(linear.weight.data_ptr())
            total += linear.weight.numel() * linear.weight.element_size()
    return total


def step_read_bytes(engine, names: list, drop: int | None) -> int:
    """Base linears + each distinct adapter once (AdapterDrop k: in layers >= k only)."""
    adapters = {name for name in names if name}
    share = (LAYERS - (drop or 0)) / LAYERS
    return linear_bytes(engine) + int(share * sum(engine.adapters.get(name).num_bytes for name in adapters))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--bytes-only", action="store_true", help="only the weight bytes per decode step, no timing")
    ap.add_argument("--kinds", nargs="+", default=KINDS, choices=KINDS,
                    help="kinds loaded into the engine (stacks are bucketed by rank class, adapters/bottleneck_stacks.py: "
                         "with parallel's r 512 loaded the r 64 adapters should still cost r 64)")
    args = ap.parse_args()
    kinds = args.kinds
    n = args.requests
    base = llama_160m("float32")
    engine = LLMEngine(EngineConfig(model=str(base), dtype="float32", max_num_seqs=n, max_num_batched_tokens=4096,
                                    kv_cache_memory="1GiB", max_loras=64))
    names = {}
    for kind in kinds:
        for i, path in enumerate(adapterhub_adapters.make(kind, 8, HIDDEN, LAYERS, WIDTHS)):
            engine.adapters.load(f"{kind}{i}", path)
        names[kind] = [f"{kind}{i % 8}" for i in range(n)]
    prompts = random_prompts(n, args.prompt_len)
    engine.generate(prompts[:8], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True),
                    names[kinds[0]][:8])                                   # warm up
    cases = [("base only", [None] * n, None)] + [(f"8 {kind}", names[kind], None) for kind in kinds]
    if "houlsby" in kinds:
        cases += [(f"8 houlsby, AdapterDrop k={k}", names["houlsby"], k) for k in (2, 4, 6, 8)]
    read = {label: step_read_bytes(engine, case_names, drop) for label, case_names, drop in cases}
    if args.bytes_only:
        print("| case | weights read per decode step, MB | read-bound limit vs base |")
        print("|---|---|---|")
        for label, *_ in cases:
            print(f"| {label} | {read[label] / 1e6:.0f} | {read[cases[0][0]] / read[label]:.2f} |")
        return
    samples: dict[str, list[tuple[float, float]]] = {label: [] for label, *_ in cases}
    for _ in range(args.rounds):
        for label, case_names, drop in cases:
            samples[label].append(run(engine, prompts, case_names, args.output_len, drop))
    rows = []
    for label, _, drop in cases:
        tok_s = statistics.median(s[0] for s in samples[label])
        step_ms = 1000 * statistics.median(s[1] for s in samples[label])
        row = dict(case=label, tok_s=tok_s, decode_step_ms=step_ms, drop=drop or 0, read_bytes=read[label],
                   samples=samples[label])
        emit(row)
        rows.append(row)
    base_tok_s = rows[0]["tok_s"]
    print(f"\nmachine: {machine()}; {n} requests x {args.prompt_len} prompt + {args.output_len} greedy output tokens, "
          f"160M random Llama fp32; median of {args.rounds} interleaved rounds\n")
    print("| case | tok/s | vs base | decode step ms | weights read per step, MB | read-bound limit vs base |")
    print("|---|---|---|---|---|---|")
    base_read = rows[0]["read_bytes"]
    for r in rows:
        print(f"| {r['case']} | {r['tok_s']:.0f} | {r['tok_s'] / base_tok_s:.2f} | {r['decode_step_ms']:.1f} | "
              f"{r['read_bytes'] / 1e6:.0f} | {base_read / r['read_bytes']:.2f} |")


if __name__ == "__main__":
    main()
