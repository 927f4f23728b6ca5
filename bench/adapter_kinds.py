"""Throughput per adapter kind: 8 distinct adapters of one kind spread over a batch, vs the base model alone.

    python -m bench.adapter_kinds [--requests 32] [--prompt-len 32] [--output-len 32] [--rounds 3]
                                  [--kinds lora ia3 bitfit]

160M random Llama fp32 (bench/common.py). Adapters (random non-zero weights, cached under the bench cache):
    lora    PEFT LoRA r=16 on all 7 linears (bench/multi_lora.py's)
    ia3     PEFT (IA)^3 with its Llama defaults: k_proj, v_proj outputs and down_proj's input
    bitfit  BitFit biases on all 7 linears of every layer (adapters/bitfit.py's format)
A new kind is one entry in MAKERS: name -> (description, make(base_dir, count) -> adapter directories).
Every case runs the same prompts; the cases are interleaved over --rounds (median kept), so a slow spell of this
shared machine hits all alike. Prints one JSON line per case and a markdown table.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Callable

import torch

from bench.common import CACHE, emit, llama_160m, machine, random_prompts, run_requests
from bench.multi_lora import make_adapters as make_lora
from server.config import EngineConfig
from server.engine import LLMEngine
from server.sampling import SamplingParams

TARGETS = {"ia3": 0.85, "bitfit": 0.95}      # issue #10: throughput vs base


def make_ia3(base: Path, count: int) -> list[str]:
    from peft import IA3Config, get_peft_model
    from transformers import LlamaForCausalLM
    root = CACHE / "ia3"
    paths = [root / f"a{i:03d}" for i in range(count)]
    missing = [p for p in paths if not (p / "adapter_model.safetensors").exists()]
    if missing:
        model = get_peft_model(LlamaForCausalLM.from_pretrained(base),
                               IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                         feedforward_modules=["down_proj"]))
        for path in missing:
            g = torch.Generator().manual_seed(int(path.name[1:]))
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "ia3_l" in name:
                        p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            model.save_pretrained(path)
    return [str(p) for p in paths]


def make_bitfit(base: Path, count: int) -> list[str]:
    from safetensors.torch import save_file
    from transformers import AutoConfig
    from adapters.bitfit import tensor_name
    config = AutoConfig.from_pretrained(base)
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    widths = {"q_proj": h, "k_proj": kv, "v_proj": kv, "o_proj": h, "gate_proj": i, "up_proj": i, "down_proj": h}
    root = CACHE / "bitfit"
    paths = [root / f"a{i:03d}" for i in range(count)]
    for path in paths:
        if (path / "adapter_model.safetensors").exists():
            continue
        g = torch.Generator().manual_seed(int(path.name[1:]))
        tensors = {tensor_name(layer, name): torch.randn(width, generator=g) * 0.02
                   for layer in range(config.num_hidden_layers) for name, width in widths.items()}
        path.mkdir(parents=True, exist_ok=True)
        save_file(tensors, path / "adapter_model.safetensors")
        (path / "adapter_config.json").write_text(json.dumps({"peft_type": "BITFIT"}))
    return [str(p) for p in paths]


# kind -> (what the adapters are, make(base_dir, count) -> adapter dirs). Bottleneck kinds go here too.
MAKERS: dict[str, tuple[str, Callable[[Path, int], list[str]]]] = {
    "lora": ("LoRA r=16, all 7 linears", lambda base, n: make_lora(base, n)),
    "ia3": ("(IA)^3 k, v, down_proj (input)", make_ia3),
    "bitfit": ("BitFit, biases of all 7 linears", make_bitfit),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved repetitions of every case (median kept)")
    ap.add_argument("--adapters", type=int, default=8, help="distinct adapters of each kind")
    ap.add_argument("--kinds", nargs="+", default=list(MAKERS), choices=list(MAKERS))
    args = ap.parse_args()
    n, k = args.requests, args.adapters
    base = llama_160m("float32")
    prompts = random_prompts(n, args.prompt_len)
    engine = LLMEngine(EngineConfig(model=str(base), dtype="float32", max_num_seqs=n, max_num_batched_tokens=4096,
                                    kv_cache_memory="2GiB", max_loras=k * len(args.kinds)))
    cases = [("base", "base only", [None] * n)]
    for kind in args.kinds:
        description, make = MAKERS[kind]
        for i, path in enumerate(make(base, k)):
            engine.adapters.load(f"{kind}-{i}", path)
        cases.append((kind, f"{k} {description}", [f"{kind}-{i % k}" for i in range(n)]))
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    for _, _, names in cases:                                              # warm up every path
        engine.generate(prompts[:4], params, names[:4])
    samples: dict[str, list[float]] = {kind: [] for kind, _, _ in cases}
    for _ in range(args.rounds):
        for kind, _, names in cases:
            samples[kind].append(run_requests(engine, prompts, names, args.output_len))
    base_tok_s = statistics.median(samples["base"])
    rows = []
    for kind, label, _ in cases:
        tok_s = statistics.median(samples[kind])
        row = dict(kind=kind, case=label, tok_s=tok_s, vs_base=tok_s / base_tok_s, samples=samples[kind],
                   target=TARGETS.get(kind))
        emit(row)
        rows.append(row)
    print(f"\nmachine: {machine()}; {n} requests x {args.prompt_len} prompt + {args.output_len} greedy output "
          f"tokens, 160M random Llama fp32, {k} distinct adapters per kind spread over the batch; median of "
          f"{args.rounds} interleaved rounds\n")
    print("| kind | adapters | tok/s | vs base | target |")
    print("|---|---|---|---|---|")
    for r in rows:
        target = f">= {r['target']:.2f}" if r["target"] else ""
        print(f"| {r['kind']} | {r['case']} | {r['tok_s']:.0f} | {r['vs_base']:.2f} | {target} |")


if __name__ == "__main__":
    main()
