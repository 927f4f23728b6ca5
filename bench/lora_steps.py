"""Where 8 LoRA adapters cost against the base model at 32 sequences: decode steps and prefill apart.

    python -m bench.lora_steps [--model smollm2-135m] [--dtype float32] [--steps 60] [--rounds 4]

bench/http.py's 32-concurrent workload (chat-templated ~80-token prompts; request i for adapter lora{i mod 8}, r=16
on all seven linears) split into its two kinds of steps, each measured base and LoRA in turns so that the
machine's drift falls on both:
  decode   two engines in this process, one with 32 base sequences and one with 32 LoRA sequences, both past
           their prompts, stepped one after the other --steps times: per step the median time, the decode
           kernel's part of it (kernels/decode_layers) and the rest (Python).
  prefill  one engine (prefix caching off): 32 fresh prompts for the base model, then 32 fresh ones for the
           adapters (the order alternating each round), timed until every prompt has its first token.
"""
from __future__ import annotations

import argparse
import statistics
import time
import types

from bench import http
from bench.common import machine


def kernel_timer():
    """Wrap the decode kernel's entry point as server/model/decode_stack.py calls it; returns the list it fills
    with seconds per call."""
    import server.model.decode_stack as stack
    calls, real = [], stack.dl.decode_layers

    def timed(*args, **kwargs):
        start = time.perf_counter()
        out = real(*args, **kwargs)
        calls.append(time.perf_counter() - start)
        return out
    stack.dl.decode_layers = timed
    return calls


def add(engine, prompts, names, base_name, tag, max_tokens):
    from server.sampling import SamplingParams
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i, (prompt, name) in enumerate(zip(prompts, names)):
        engine.add_request(f"{tag}-{i}", prompt, params, None if name == base_name else name)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", choices=["smollm2-135m", "llama-160m"])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    settings = types.SimpleNamespace(dtype=args.dtype, concurrency=32, kv_cache_memory="1GiB")
    base = http.model_dir(args.model)
    dirs = {k: v for k, v in http.make_adapters(base, args.model, 64).items() if k < "lora008"}
    prompt_len = 32 if args.model == "llama-160m" else 80
    cases = {"base": http.case_names("base", 32, args.model), "lora8": http.case_names("lora8", 32, args.model)}
    calls = kernel_timer()

    engines = {}
    prompts = http.prompts_for(args.model, base, 32, prompt_len)
    for case, names in cases.items():
        engine = engines[case] = http.offline_engine(base, args.model, dirs, settings)
        add(engine, prompts, names, args.model, f"decode-{case}", args.steps + 40)
        for _ in range(5):
            engine.step()
    decode = {case: [] for case in cases}
    for _ in range(args.steps):
        for case, engine in engines.items():
            calls.clear()
            start = time.perf_counter()
            engine.step()
            decode[case].append((time.perf_counter() - start, sum(calls)))
    del engines

    engine = http.offline_engine(base, args.model, dirs, settings, prefix_caching=False)
    prefill = {case: [] for case in cases}
    for r in range(args.rounds + 1):                 # round 0 warms up
        for case in (list(cases) if r % 2 == 0 else list(cases)[::-1]):
            fresh = http.prompts_for(args.model, base, 32, prompt_len, seed=1000 + 2 * r + (case == "lora8"))
            add(engine, fresh, cases[case], args.model, f"prefill-{case}-{r}", 1)
            start = time.perf_counter()
            while engine.has_unfinished():
                engine.step()
            if r:
                prefill[case].append(time.perf_counter() - start)

    print(f"\nmachine: {machine()}; {args.model} {args.dtype}, 32 sequences, 8 LoRA adapters (r=16, all linears)\n")
    print("| case | decode step ms | its kernel ms | its Python ms | prefill of 32 prompts ms |")
    print("|---|---|---|---|---|")
    for case in cases:
        steps = decode[case]
        print(f"| {case} | {statistics.median(s for s, _ in steps) * 1e3:.1f} | "
              f"{statistics.median(k for _, k in steps) * 1e3:.1f} | "
              f"{statistics.median(s - k for s, k in steps) * 1e3:.2f} | {statistics.median(prefill[case]) * 1e3:.0f} |")
    pairs = [b[0] / l[0] for b, l in zip(decode["base"], decode["lora8"])]
    fills = [b / l for b, l in zip(prefill["base"], prefill["lora8"])]
    print(f"\nLoRA / base speed: decode steps {statistics.median(pairs):.3f} (median over step pairs), "
          f"prefill {statistics.median(fills):.3f} (median over rounds)")


if __name__ == "__main__":
    main()
