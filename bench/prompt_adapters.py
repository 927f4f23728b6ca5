"""Prefix / prompt tuning throughput: base only vs batches of prefix-tuning (20 virtual tokens), prompt-tuning
(20 virtual tokens), LoRA, and all of them mixed with base requests; prefix with AdapterDrop.

    python -m bench.prompt_adapters [--requests 64] [--prompt-len 32] [--output-len 64] [--virtual-tokens 20]

160M random Llama (bench/common.py); adapters made by `peft` and saved with save_pretrained. Prefix and prompt
tuning cost only attention: their virtual tokens' K/V sit once in shared KV blocks, so each request attends
`virtual + pad` more key slots (the prefix is right-aligned in whole blocks) and computes nothing more. The table
gives the key slots gathered per decode step (batch x key width, summed over attention groups, averaged over
layers) next to the time, so the extra cost can be read against the extra columns. A decode group is as wide as
its longest member, so base requests batched with prefix requests pay the wider gather too (masked). One JSON
line per point, then a markdown table.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from bench.common import CACHE, Timer, emit, llama_160m, machine, random_prompts, run_requests
from bench.multi_lora import make_adapters
from server.config import EngineConfig
from server.engine import LLMEngine
from server.sampling import SamplingParams


def make_prompt_adapters(base_path, num_virtual: int) -> dict[str, str]:
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model
    from transformers import LlamaForCausalLM
    configs = {"prefix": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual),
               "prompt": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual)}
    paths = {}
    for name, config in configs.items():
        path = CACHE / f"{name}-v{num_virtual}"
        if not (path / "adapter_model.safetensors").exists():
            model = get_peft_model(LlamaForCausalLM.from_pretrained(base_path), config)
            g = torch.Generator().manual_seed(len(name))
            with torch.no_grad():
                for p in model.prompt_encoder.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            model.save_pretrained(path)
        paths[name] = str(path)
    return paths


class StepStats:
    """Wraps the runner: wall time of each decode-only step and the key slots its attention gathers (batch x
    key width, summed over groups, averaged over layers)."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.decode_ms: list[float] = []
        self.key_slots: list[int] = []
        run, build = engine.runner.run, engine.runner.build_meta
        self._slots = 0

        def build_meta(order):
            meta, sampled = build(order)
            layers = range(engine.runner.spec.num_layers)          # AdapterDrop: fewer slots below layer k
            self._slots = sum(g.block_tables.numel() for layer in layers for g in meta.groups(layer)) \
                * engine.runner.block_size / len(layers)
            return meta, sampled

        def timed_run(batch):
            with Timer() as t:
                out = run(batch)
            if all(item.num_tokens == 1 for item in batch.scheduled):
                self.decode_ms.append(t.seconds * 1e3)
                self.key_slots.append(self._slots)
            return out
        engine.runner.build_meta = build_meta
        engine.runner.run = timed_run

    def reset(self):
        self.decode_ms, self.key_slots = [], []


def run(engine, stats: StepStats, prompts, names, output_len, drop=None) -> dict:
    stats.reset()
    tok_s = run_requests(engine, prompts, names, output_len, drop)
    return dict(tok_s=tok_s, decode_step_ms=statistics.median(stats.decode_ms),
                key_slots=statistics.mean(stats.key_slots))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--virtual-tokens", type=int, default=20)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2, help="best of this many runs per point")
    args = ap.parse_args()
    n = args.requests
    base = llama_160m("float32")
    paths = {**make_prompt_adapters(base, args.virtual_tokens), "lora": make_adapters(base, 1)[0]}
    prompts = random_prompts(n, args.prompt_len)
    engine = LLMEngine(EngineConfig(model=str(base), dtype="float32", max_num_seqs=n, max_num_batched_tokens=4096,
                                    kv_cache_memory="2GiB", block_size=args.block_size))
    load_ms = {}
    for name, path in paths.items():
        with Timer() as t:
            engine.adapters.load(name, path)
        load_ms[name] = t.seconds * 1e3
    stats = StepStats(engine)
    engine.generate(prompts[:8], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True),
                    ["prefix", "prompt", "lora", None] * 2)                          # warm up
    mixed = [("prefix", "prompt", "lora", None)[i % 4] for i in range(n)]
    cases = [("base only", [None] * n, None), ("prefix", ["prefix"] * n, None), ("prompt", ["prompt"] * n, None),
             ("lora r=16", ["lora"] * n, None), ("mixed: prefix/prompt/lora/base", mixed, None),
             ("prefix, AdapterDrop k=4", ["prefix"] * n, 4)]
    rows = []
    for label, names, drop in cases:
        result = max((run(engine, stats, prompts, names, args.output_len, drop) for _ in range(args.repeats)),
                     key=lambda r: r["tok_s"])
        row = dict(case=label, **result, drop=drop or 0)
        emit(row)
        rows.append(row)
    base_row = rows[0]
    emit(dict(case="load", **{f"{k}_ms": v for k, v in load_ms.items()}))

    print(f"\nmachine: {machine()}; {n} requests x {args.prompt_len} prompt + {args.output_len} greedy output "
          f"tokens, 160M random Llama fp32, {args.virtual_tokens} virtual tokens, block size {args.block_size}\n")
    print("| case | tok/s | vs base | decode step ms (median) | key slots per decode step | vs base |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['tok_s']:.0f} | {r['tok_s'] / base_row['tok_s']:.0%} | "
              f"{r['decode_step_ms']:.1f} | {r['key_slots']:.0f} | {r['key_slots'] / base_row['key_slots']:.2f}x |")
    print("\nload: " + ", ".join(f"{k} {v:.0f} ms" for k, v in load_ms.items()))


if __name__ == "__main__":
    main()
