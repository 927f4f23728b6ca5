"""Multi-LoRA throughput: base only vs 1 / 8 / 64 distinct r=16 all-linear adapters in one batch, AdapterDrop,
and HF PEFT's mixed-batch `generate` on the same adapters at the same batch size (warmed up, interleaved with
our cases in every round, median of --rounds).

    python -m bench.multi_lora [--requests 64] [--prompt-len 32] [--output-len 64] [--skip-peft]

160M random Llama (bench/common.py); adapters made by `peft` (random A and B) and saved with save_pretrained.
Prints one JSON line per point and a markdown table, including the bytes one decode step must read.
"""
from __future__ import annotations

import argparse
import copy
import statistics

import torch

from bench.common import CACHE, Timer, emit, llama_160m, machine, random_prompts, run_requests
from server.config import EngineConfig
from server.engine import LLMEngine
from server.sampling import SamplingParams

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapters(base_path, count: int, rank: int = 16, cache_key: str = "llama-160m") -> list[str]:
    """`count` adapters for the base at `base_path` (cached under its `cache_key`)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM
    root = CACHE / (f"lora-r{rank}" if cache_key == "llama-160m" else f"lora-r{rank}-{cache_key}")
    paths = [root / f"a{i:03d}" for i in range(count)]
    missing = [p for p in paths if not (p / "adapter_model.safetensors").exists()]
    if missing:
        model = get_peft_model(LlamaForCausalLM.from_pretrained(base_path),
                               LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=copy.copy(LINEARS)))
        for path in missing:
            g = torch.Generator().manual_seed(int(path.name[1:]))
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_" in name:
                        p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            model.save_pretrained(path)
    return [str(p) for p in paths]


def load_peft(base_path, adapter_paths, names):
    """One PeftModel with every adapter `names` uses, warmed up (one short mixed-batch generate)."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM
    uniq = sorted(set(names))
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_path), adapter_paths[uniq[0]],
                                      adapter_name=uniq[0])
    for name in uniq[1:]:
        model.load_adapter(adapter_paths[name], adapter_name=name)
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    with torch.inference_mode():
        model.generate(input_ids=torch.tensor([[5] * 8] * len(uniq)), adapter_names=uniq, max_new_tokens=4,
                       do_sample=False)
    return model


def run_peft(model, prompts, names, output_len):
    """PEFT's mixed-batch `generate` on all requests in one batch; output tokens per second."""
    with torch.inference_mode(), Timer() as t:
        out = model.generate(input_ids=torch.tensor(prompts), adapter_names=names, max_new_tokens=output_len,
                             min_new_tokens=output_len, do_sample=False)
    return (out.shape[1] - len(prompts[0])) * len(prompts) / t.seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved repetitions of every case (median kept)")
    args = ap.parse_args()
    n = args.requests
    base = llama_160m("float32")
    paths = make_adapters(base, n)
    prompts = random_prompts(n, args.prompt_len)
    engine = LLMEngine(EngineConfig(model=str(base), dtype="float32", max_num_seqs=n, max_num_batched_tokens=4096,
                                    kv_cache_memory="2GiB", max_loras=n))
    names_by_n = {}
    for i, p in enumerate(paths):
        engine.adapters.load(f"a{i:03d}", p)
    for distinct in (1, 8, n):
        names_by_n[distinct] = [f"a{i % distinct:03d}" for i in range(n)]
    engine.generate(prompts[:8], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True),
                    names_by_n[8][:8])                                    # warm up
    base_bytes = sum(m.weight.numel() * m.weight.element_size() for m in engine.runner.model.modules()
                     if hasattr(m, "slices"))
    adapter_bytes = engine.adapters.get("a000").num_bytes
    cases = [("base only", [None] * n, 0, None)]
    cases += [(f"{d} adapter{'s' if d > 1 else ''}", names_by_n[d], d, None) for d in (1, 8, n)]
    cases += [(f"{n} adapters, AdapterDrop k={k}", names_by_n[n], n, k) for k in (2, 4, 6)]
    peft_model = None
    if not args.skip_peft:
        adapter_paths = {f"a{i:03d}": p for i, p in enumerate(paths)}
        peft_model = load_peft(base, adapter_paths, names_by_n[n])
    # Rounds interleave the cases (PEFT's too), so a slow spell of this shared machine hits all of them alike.
    samples: dict[str, list[float]] = {label: [] for label, *_ in cases}
    peft_samples: dict[int, list[float]] = {8: [], n: []}
    for _ in range(args.rounds):
        for label, names, _, drop in cases:
            samples[label].append(run_requests(engine, prompts, names, args.output_len, drop))
        if peft_model is not None:
            for distinct in peft_samples:
                peft_samples[distinct].append(run_peft(peft_model, prompts, names_by_n[distinct], args.output_len))
    rows = []
    for label, _, distinct, drop in cases:
        row = dict(case=label, tok_s=statistics.median(samples[label]), samples=samples[label], distinct=distinct,
                   drop=drop or 0, step_bytes_base=base_bytes, step_bytes_adapters=adapter_bytes * distinct)
        emit(row)
        rows.append(row)
    base_tok_s = rows[0]["tok_s"]
    peft = {}
    if peft_model is not None:
        for distinct, values in peft_samples.items():
            peft[distinct] = statistics.median(values)
            emit(dict(case=f"peft {distinct} adapters", tok_s=peft[distinct], samples=values))

    print(f"\nmachine: {machine()}; {n} requests x {args.prompt_len} prompt + {args.output_len} greedy output "
          f"tokens, 160M random Llama fp32, r=16 adapters on all 7 linears; median of {args.rounds} interleaved "
          "rounds\n")
    print("| case | tok/s | vs base | MB read per decode step (base + adapters) | HF PEFT tok/s | ours / PEFT |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        p = peft.get(r["distinct"]) if not r["drop"] else None
        peft_cells = f"{p:.0f} | {r['tok_s'] / p:.1f}x" if p else " | "
        print(f"| {r['case']} | {r['tok_s']:.0f} | {r['tok_s'] / base_tok_s:.0%} | "
              f"{r['step_bytes_base'] / 1e6:.0f} + {r['step_bytes_adapters'] / 1e6:.0f} | {peft_cells} |")


if __name__ == "__main__":
    main()
