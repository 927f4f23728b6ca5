"""Shared pieces of the benchmarks: the 160M random Llama, prompts, timing helpers."""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

from server.demo import _save_tokenizer, _train_tokenizer

CACHE = Path(os.environ.get("PEFTSERVE_BENCH_CACHE", Path.home() / ".cache" / "peftserve" / "bench"))

# the foundation issue's 160M model: hidden 1024, 8 layers, 16 heads, 8 KV heads, intermediate 2816, vocab 32000
LLAMA_160M = dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=8,
                  intermediate_size=2816, vocab_size=32000, max_position_embeddings=2048,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)


def llama_160m(dtype: str = "float32") -> Path:
    """Save (once) the random 160M Llama in HF format with a small BPE tokenizer; return its directory."""
    from transformers import LlamaConfig, LlamaForCausalLM
    path = CACHE / f"llama-160m-{dtype}"
    if (path / "config.json").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA_160M)).to(getattr(torch, dtype))
    model.save_pretrained(path, safe_serialization=True)
    _save_tokenizer(_train_tokenizer(4096), path)
    return path


def random_prompts(n: int, length: int, vocab: int = 32000, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, length), generator=g).tolist()


def machine() -> str:
    return (f"{platform.machine()} {os.cpu_count()} cores ({_cpu_features()}), torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def _cpu_features() -> str:
    """Which of the instruction sets our kernels and the BLAS use this CPU has: the numbers differ by them."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return "flags unknown"
    have = [name for flag, name in (("avx512f", "AVX-512"), ("avx512_bf16", "AVX512-BF16"), ("amx_bf16", "AMX"))
            if flag in flags]
    return ", ".join(have) or "no AVX-512"


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def run_requests(engine, prompts, names, output_len: int, drop=None) -> float:
    """Add one greedy request per prompt (request i for adapter names[i], None = base; AdapterDrop `drop`),
    step the engine until all finish; returns output tokens per second."""
    from server.sampling import SamplingParams
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    for i, (prompt, name) in enumerate(zip(prompts, names)):
        engine.add_request(f"q{i}", prompt, params, name, adapter_drop=drop if name else None)
    n_out = 0
    with Timer() as t:
        while engine.has_unfinished():
            n_out += sum(len(o.token_ids) for o in engine.step())
    return n_out / t.seconds


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
