"""Offline engine throughput vs transformers `generate`, and the decode step vs its bare-matmul floor.

    python -m bench.throughput [--models llama-160m smollm2-135m] [--dtypes float32 bfloat16] [--requests 64]
                               [--prompt-len 32] [--output-len 64]

Models: the 160M random Llama (bench/common.py; 8 wide layers) and the default model, SmolLM2-135M-Instruct
(30 narrow layers, real weights). For each model and dtype, in one run: our engine on all requests at once
(continuous batching, greedy), transformers `generate` at batch 8, 32 and all requests in one batch on the
same weights (warmed up), and the time
of one decode step's bare weight matmuls (every linear layer + lm_head at the same token count).
Prints one JSON line per point and a markdown table.
"""
from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from bench.common import Timer, emit, llama_160m, machine, random_prompts
from server.config import EngineConfig
from server.default_model import ensure_default_model
from server.engine import LLMEngine
from server.sampling import SamplingParams


def run_engine(path, dtype, prompts, output_len):
    engine = LLMEngine(EngineConfig(model=str(path), dtype=dtype, max_num_seqs=len(prompts),
                                    max_num_batched_tokens=4096, kv_cache_memory="2GiB"))
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    engine.generate(prompts[:4], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))   # warm up
    step_log = []                                   # (tokens in step, is decode-only, seconds)
    schedule, step = engine.scheduler.schedule, engine.step

    def timed_step():
        with Timer() as t:
            outs = step()
        step_log.append((last["tokens"], last["decode_only"], t.seconds))
        return outs
    last = {}

    def logged_schedule():
        out = schedule()
        last["tokens"] = out.num_tokens
        last["decode_only"] = all(i.num_tokens == 1 for i in out.scheduled)
        return out
    engine.scheduler.schedule, engine.step = logged_schedule, timed_step
    with Timer() as t:
        outputs = engine.generate(prompts, params)
    n_out = sum(len(o) for o in outputs)
    full_decode = [s for n, d, s in step_log if d and n == len(prompts)]
    return engine, n_out / t.seconds, statistics.median(full_decode), t.seconds


def matmul_floor(engine, num_tokens, repeats=5):
    """Seconds for the bare weight matmuls of one step at `num_tokens` tokens (all linears + lm_head)."""
    model = engine.runner.model
    weights = [m.weight for m in model.modules() if hasattr(m, "slices")]   # every Linear, lm_head included
    xs = {w.shape[1]: torch.randn(num_tokens, w.shape[1], dtype=w.dtype) for w in weights}
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            with Timer() as t:
                for w in weights:
                    F.linear(xs[w.shape[1]], w)
            times.append(t.seconds)
    return statistics.median(times[1:])


def run_hf(path, dtype, prompts, output_len, batch_size, max_batches):
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    batches = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)][:max_batches]
    with torch.inference_mode():
        model.generate(torch.tensor(batches[0][:2]), max_new_tokens=4, do_sample=False)   # warm up
        n_out = 0
        with Timer() as t:
            for batch in batches:
                out = model.generate(torch.tensor(batch), max_new_tokens=output_len, min_new_tokens=output_len,
                                     do_sample=False)
                n_out += (out.shape[1] - len(batch[0])) * len(batch)
    return n_out / t.seconds


MODELS = {"llama-160m": lambda: llama_160m("float32"), "smollm2-135m": ensure_default_model}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--hf-max-batches", type=int, default=2, help="HF batches timed per batch size")
    args = ap.parse_args()
    prompts = random_prompts(args.requests, args.prompt_len)
    rows = []
    for model, dtype in [(m, d) for m in args.models for d in args.dtypes]:
        path = MODELS[model]()
        engine, ours, step_s, total_s = run_engine(path, dtype, prompts, args.output_len)
        floor_s = matmul_floor(engine, args.requests)
        del engine
        hf = {bs: run_hf(path, dtype, prompts, args.output_len, bs, args.hf_max_batches)
              for bs in (8, 32, len(prompts))}
        row = dict(model=model, dtype=dtype, ours_tok_s=ours, hf_b8_tok_s=hf[8], hf_b32_tok_s=hf[32],
                   hf_all_tok_s=hf[len(prompts)],
                   decode_step_ms=step_s * 1e3, matmul_floor_ms=floor_s * 1e3, step_over_floor=step_s / floor_s,
                   vs_best_hf=ours / max(hf.values()), total_s=total_s)
        emit(row)
        rows.append(row)
    print(f"\nmachine: {machine()}; {args.requests} requests x {args.prompt_len} prompt + {args.output_len} "
          "greedy output tokens\n")
    print("| model | dtype | ours tok/s | HF generate b=8 tok/s | HF generate b=32 tok/s "
          f"| HF generate b={args.requests} tok/s | ours / best HF "
          f"| decode step ms ({args.requests} seqs) | matmul floor ms | step / floor |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['dtype']} | {r['ours_tok_s']:.0f} | {r['hf_b8_tok_s']:.0f} | {r['hf_b32_tok_s']:.0f} | "
              f"{r['hf_all_tok_s']:.0f} | "
              f"{r['vs_best_hf']:.2f}x | {r['decode_step_ms']:.1f} | {r['matmul_floor_ms']:.1f} | "
              f"{r['step_over_floor']:.2f}x |")


if __name__ == "__main__":
    main()
