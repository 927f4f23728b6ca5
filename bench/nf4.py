"""4-bit NF4 base vs fp32 / bf16 bases, with 8 LoRA adapters, next to transformers + PEFT (+ bitsandbytes 4-bit).

    python -m bench.nf4 [--model smollm2-135m|llama-160m] [--requests 64] [--prompt-len 32] [--output-len 64]
                        [--hf-batch-sizes 8 32] [--hf-max-batches 2]

Every case runs in its own process (so its RSS is its own): load the base, load 8 r=16 all-linear LoRA adapters
(made by PEFT, random A and B), warm up, then time greedy decoding of the requests (request i uses adapter i mod 8).
Ours: all requests at once (continuous batching). transformers + PEFT `generate(adapter_names=...)`: batches of
each --hf-batch-sizes, the first --hf-max-batches of them timed; warm-up: one short generate. bitsandbytes runs as
it ships (on an AVX512-BF16 CPU it repacks each layer for its bf16 kernel at the first forward).
Reported per case: bytes of the linear-layer weights (4-bit: packed data + block scales), bytes of all weights,
process RSS after loading and its peak, output tokens per second. One JSON line per case, then a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

from bench.common import Timer, emit, llama_160m, machine, random_prompts, run_requests
from bench.multi_lora import make_adapters

NUM_ADAPTERS = 8
OURS = {  # case -> EngineConfig fields
    "fp32": dict(dtype="float32"),
    "bf16": dict(dtype="bfloat16"),
    "nf4 (fp32 compute)": dict(dtype="float32", quantize="nf4"),
    "nf4 (bf16 compute)": dict(dtype="bfloat16", quantize="nf4"),
    "nf4 + double quant (bf16 compute)": dict(dtype="bfloat16", quantize="nf4", double_quant=True),
}
HF = {  # case -> (dtype, 4-bit)
    "fp32": ("float32", False),
    "bf16": ("bfloat16", False),
    "nf4 (bitsandbytes, bf16 compute)": ("bfloat16", True),
    "nf4 (bitsandbytes, fp32 compute)": ("float32", True),
}


def model_path(name: str) -> str:
    if name == "llama-160m":
        return str(llama_160m("float32"))
    from server.default_model import ensure_default_model
    return ensure_default_model()


def rss() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in bytes."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


def run_ours(args, case: str) -> dict:
    from server.config import EngineConfig
    from server.engine import LLMEngine
    from server.model.llama import Linear
    from server.sampling import SamplingParams
    path = model_path(args.model)
    adapters = make_adapters(path, NUM_ADAPTERS, cache_key=args.model)
    engine = LLMEngine(EngineConfig(model=path, max_num_seqs=args.requests, max_num_batched_tokens=4096,
                                    kv_cache_memory="256MiB", **OURS[case]))
    names = [f"a{i}" for i in range(NUM_ADAPTERS)]
    for name, adapter in zip(names, adapters):
        engine.adapters.load(name, adapter)
    linears = [m for m in engine.runner.model.layers.modules() if isinstance(m, Linear)]
    linear_bytes = sum(m.quantized.nbytes if m.quantized is not None else m.weight.numel() * m.weight.element_size()
                       for m in linears)
    loaded_rss, _ = rss()
    prompts = random_prompts(args.requests, args.prompt_len, engine.vocab_size)
    engine.generate(prompts[:4], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))   # warm up
    tok_s = run_requests(engine, prompts, [names[i % NUM_ADAPTERS] for i in range(args.requests)], args.output_len)
    return dict(linear_bytes=linear_bytes, weight_bytes=engine.runner.weight_bytes, rss_loaded=loaded_rss,
                rss_peak=rss()[1], tok_s=tok_s, batch=args.requests)


def hf_weight_bytes(model) -> tuple[int, int]:
    """(decoder-layer linear bytes, all weight bytes) of a transformers model; a 4-bit weight counts its packed
    data and its quant state (absmax, nested absmax and offset)."""
    def size(p):
        state = getattr(p, "quant_state", None)
        extra = 0 if state is None else state.absmax.nbytes + (state.state2.absmax.nbytes + 4 if state.nested else 0)
        return p.numel() * p.element_size() + extra
    layers = model.model.layers
    linear = sum(size(m.weight) for m in layers.modules()
                 if isinstance(getattr(m, "weight", None), torch.nn.Parameter) and m.weight.dim() == 2)
    return linear, sum(size(p) for p in model.parameters())


def run_hf(args, case: str, batch_size: int) -> dict:
    import transformers
    from peft import PeftModel
    path = model_path(args.model)
    adapters = make_adapters(path, NUM_ADAPTERS, cache_key=args.model)
    dtype, four_bit = HF[case]
    kwargs = dict(dtype=getattr(torch, dtype))
    if four_bit:
        kwargs.update(device_map="cpu", quantization_config=transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=getattr(torch, dtype)))
    base = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
    linear_bytes, weight_bytes = hf_weight_bytes(base)
    names = [f"a{i}" for i in range(NUM_ADAPTERS)]
    model = PeftModel.from_pretrained(base, adapters[0], adapter_name=names[0])
    for name, adapter in zip(names[1:], adapters[1:]):
        model.load_adapter(adapter, adapter_name=name)
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    loaded_rss, _ = rss()
    prompts = random_prompts(args.requests, args.prompt_len, base.config.vocab_size)
    request_names = [names[i % NUM_ADAPTERS] for i in range(args.requests)]
    batches = [(prompts[i:i + batch_size], request_names[i:i + batch_size])
               for i in range(0, len(prompts), batch_size)][:args.hf_max_batches]
    with torch.inference_mode():
        model.generate(input_ids=torch.tensor(prompts[:2]), adapter_names=request_names[:2], max_new_tokens=4,
                       do_sample=False)                                                         # warm up
        n_out = 0
        with Timer() as t:
            for batch, batch_names in batches:
                out = model.generate(input_ids=torch.tensor(batch), adapter_names=batch_names,
                                     max_new_tokens=args.output_len, min_new_tokens=args.output_len, do_sample=False)
                n_out += (out.shape[1] - len(batch[0])) * len(batch)
    return dict(linear_bytes=linear_bytes, weight_bytes=weight_bytes, rss_loaded=loaded_rss, rss_peak=rss()[1],
                tok_s=n_out / t.seconds, batch=batch_size)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", choices=["smollm2-135m", "llama-160m"])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--hf-batch-sizes", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--hf-max-batches", type=int, default=2)
    ap.add_argument("--ours", nargs="*", default=list(OURS), help="our cases to run")
    ap.add_argument("--hf", nargs="*", default=list(HF), help="transformers cases to run")
    ap.add_argument("--one", help=argparse.SUPPRESS)        # internal: run one case in this process
    args = ap.parse_args()
    if args.one:
        engine, case, batch = json.loads(args.one)
        out = run_ours(args, case) if engine == "ours" else run_hf(args, case, batch)
        print("RESULT " + json.dumps(out), flush=True)
        return
    rows = []
    jobs = [("ours", c, None) for c in args.ours] + [("hf", c, b) for c in args.hf for b in args.hf_batch_sizes]
    for engine, case, batch in jobs:
        argv = [sys.executable, "-m", "bench.nf4", *sys.argv[1:], "--one", json.dumps([engine, case, batch])]
        proc = subprocess.run(argv, capture_output=True, text=True, env=os.environ)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            raise SystemExit(f"{engine} {case} failed:\n{proc.stderr[-3000:]}")
        row = dict(engine=engine, case=case, **json.loads(lines[-1][7:]))
        emit(row)
        rows.append(row)
    fp32 = {r["engine"]: r["linear_bytes"] for r in rows if r["case"] == "fp32"}
    print(f"\nmachine: {machine()}; model {args.model}; {NUM_ADAPTERS} r=16 all-linear LoRA adapters; "
          f"{args.requests} requests x {args.prompt_len} prompt + {args.output_len} greedy output tokens\n")
    print("| engine | base | batch | linear weights MB | vs fp32 | all weights MB | RSS loaded MB | RSS peak MB "
          "| tok/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['linear_bytes'] / fp32[r['engine']]:.3f}x" if r["engine"] in fp32 else ""
        name = "ours" if r["engine"] == "ours" else "transformers + PEFT"
        print(f"| {name} | {r['case']} | {r['batch']} | {r['linear_bytes'] / 1e6:.1f} | {ratio} | "
              f"{r['weight_bytes'] / 1e6:.1f} | {r['rss_loaded'] / 2**20:.0f} | {r['rss_peak'] / 2**20:.0f} | "
              f"{r['tok_s']:.0f} |")


if __name__ == "__main__":
    main()
