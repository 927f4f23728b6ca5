"""Throughput with half the requests under a JSON schema vs none (structured output, issue #14).

    python -m bench.structured [--dtype float32] [--concurrency 32] [--requests 96] [--max-tokens 48] [--repeats 2]

The default model, SmolLM2-135M-Instruct (real weights, its chat template), offline engine (no HTTP). A closed
loop keeps --concurrency requests in flight until --requests have finished: each finished request is replaced at
once, so the batch stays full whatever each request's length. The same chat prompts ("describe a person called
X") in both runs, greedy; in the "half" run every other request carries a JSON schema (name, age, city, hobbies).
Runs alternate (none, half, none, half, ...) after one warm-up of each. Per run: output tokens per second,
steps, and for the half run the mask work: milliseconds per step computing masks on the worker thread and
milliseconds per step the engine waited for them after the forward (the part the overlap did not hide).
One JSON line per run, then a markdown table and the ratio of median throughputs (target >= 0.9).
"""
from __future__ import annotations

import argparse
import statistics

from bench.common import Timer, emit, machine
from server.config import EngineConfig
from server.default_model import ensure_default_model
from server.demo_adapters import chat_prompt_ids
from server.engine import LLMEngine
from server.guided import guided_spec
from server.sampling import SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 24},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 3},
    },
    "required": ["name", "age", "city", "hobbies"],
    "additionalProperties": False,
}
NAMES = ["Alice", "Bob", "Chen", "Dana", "Emeka", "Farah", "Goran", "Hiro", "Ines", "Jonas", "Kemal", "Lena",
         "Mateo", "Nia", "Olga", "Pavel", "Quinn", "Rosa", "Sven", "Tariq", "Uma", "Viktor", "Wen", "Ximena"]


def run(engine: LLMEngine, prompts: list[list[int]], constrained: bool, concurrency: int, num_requests: int,
        max_tokens: int) -> dict:
    guided = guided_spec(guided_json=SCHEMA)
    times = engine.guided.times
    before = (times.compute_s, times.wait_s, times.num_masks)
    next_id, in_flight, num_out, num_steps, num_schema = 0, set(), 0, 0, 0

    def add():
        nonlocal next_id, num_schema
        with_schema = constrained and next_id % 2 == 1
        num_schema += with_schema
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, guided=guided if with_schema else None)
        rid = f"{'half' if constrained else 'none'}-{next_id}"
        engine.add_request(rid, prompts[next_id % len(prompts)], params)
        in_flight.add(rid)
        next_id += 1
    with Timer() as t:
        while next_id < min(concurrency, num_requests):
            add()
        while in_flight:
            for out in engine.step():
                num_out += len(out.token_ids)
                if out.finished:
                    if out.error is not None:
                        raise out.error
                    in_flight.discard(out.request_id)
                    if next_id < num_requests:
                        add()
            num_steps += 1
    compute_s, wait_s, num_masks = (a - b for a, b in zip((times.compute_s, times.wait_s, times.num_masks), before))
    return {"run": "half schema" if constrained else "none", "requests": num_requests, "with_schema": num_schema,
            "output_tokens": num_out, "seconds": round(t.seconds, 2), "tok_per_s": round(num_out / t.seconds, 1),
            "steps": num_steps, "step_ms": round(t.seconds / num_steps * 1e3, 1),
            "mask_compute_ms_per_step": round(compute_s / num_steps * 1e3, 3),
            "mask_wait_ms_per_step": round(wait_s / num_steps * 1e3, 3), "masks": num_masks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    engine = LLMEngine(EngineConfig(model=ensure_default_model(), dtype=args.dtype, kv_cache_memory="2GiB",
                                    max_num_seqs=args.concurrency))
    prompts = [chat_prompt_ids(engine.tokenizer, f"Describe a person called {name} as JSON with name, age, city "
                                                 "and hobbies.") for name in NAMES]
    for constrained in (False, True):                  # warm-up (and the schema's compile, cached after)
        run(engine, prompts, constrained, args.concurrency, args.concurrency, 8)
    rows = []
    for _ in range(args.repeats):
        for constrained in (False, True):
            row = run(engine, prompts, constrained, args.concurrency, args.requests, args.max_tokens)
            emit(row)
            rows.append(row)
    print(f"\n{machine()}; SmolLM2-135M-Instruct {args.dtype}, {args.concurrency} concurrent, {args.requests} "
          f"requests per run, max_tokens {args.max_tokens}, greedy\n")
    print("| run | output tokens | s | tok/s | steps | step ms | mask compute ms/step | mask wait ms/step |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['output_tokens']} | {r['seconds']} | {r['tok_per_s']} | {r['steps']} | "
              f"{r['step_ms']} | {r['mask_compute_ms_per_step']} | {r['mask_wait_ms_per_step']} |")
    none = statistics.median(r["tok_per_s"] for r in rows if r["run"] == "none")
    half = statistics.median(r["tok_per_s"] for r in rows if r["run"] != "none")
    emit({"summary": "half schema / none", "ratio": round(half / none, 3)})
    print(f"\nhalf schema / none: {half / none:.3f} (median tok/s {half} / {none})")


if __name__ == "__main__":
    main()
