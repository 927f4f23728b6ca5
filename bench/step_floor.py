"""One decode step next to its floors: weight bytes / memory bandwidth, and the bare weight matmuls.

    python -m bench.step_floor [--models smollm2-135m llama-160m] [--dtypes float32 bfloat16] [--seqs 1 8 32]
                               [--context 64] [--repeats 20] [--loras 0] [--torch-path]

For each model, dtype and batch size (sequences decoding together, each with --context tokens in its KV cache):
  read floor   bytes of every linear weight (lm_head included) / the measured read bandwidth of this machine
               (a sum over a 1 GiB buffer on huge pages, best of 5, torch threads as configured)
  matmul floor the bare matmul of every weight at that many rows, in layer order (weights stream from memory), as
               the model computes it: kernels/skinny_gemm.linear (the C kernel up to its MAX_ROWS, else F.linear)
  forward      our model forward alone (runner.run: metadata + model), median of --repeats
  step         a whole engine step (schedule, forward, sampling, detokenization, outputs), median of --repeats
  --loras N    sequences use N distinct LoRA adapters round robin (r=16 on all 7 linears, bench/http.py's)
  --torch-path also the step with the C kernels off (kernels/native.py): the layers one by one (not
               kernels/decode_layers' whole stack), F.linear (not kernels/skinny_gemm), decode attention gathering
               each sequence's KV blocks into a dense tensor per layer, then SDPA (instead of
               kernels/paged_decode reading them in place), and LoRA as the torch shrink / expand ops (instead of
               kernels/lora_fused); measured right after the default step on the same engine
Prints one JSON line per point and a markdown table.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from bench.common import emit, llama_160m, machine, random_prompts
from kernels import skinny_gemm
from server.model.weight_arena import huge_page_buffer


def read_bandwidth(gib: float = 1.0, repeats: int = 5, huge_pages: bool = True) -> float:
    """Bytes per second that a reduction over a large fp32 buffer streams from memory (best of `repeats`): on
    transparent huge pages, as the served weights are (server/model/weight_arena.py), the machine's best; with
    huge_pages=False on the 4 KiB pages of an ordinary allocation (~20% slower on the 2-core VM)."""
    if huge_pages:
        x = huge_page_buffer(int(gib * 2**30))[1].view(torch.float32).fill_(1.0)
    else:
        x = torch.ones(int(gib * 2**30) // 4)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best


def linear_weights(model) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if hasattr(m, "slices")]        # every Linear + lm_head


def matmul_floor(weights, rows: int, repeats: int) -> float:
    xs = {w.shape[1]: torch.randn(rows, w.shape[1], dtype=w.dtype) for w in weights}
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 2):
            t = time.perf_counter()
            for w in weights:
                skinny_gemm.linear(xs[w.shape[1]], w)
            times.append(time.perf_counter() - t)
    return statistics.median(times[2:])


def decode_times(engine, num_seqs: int, context: int, repeats: int,
                 adapters: list[str] = ()) -> tuple[float, float]:
    """(forward, step) seconds: median over `repeats` decode steps of `num_seqs` sequences (sequence i for
    adapters[i % len(adapters)], if any)."""
    from server.sampling import SamplingParams
    params = SamplingParams(max_tokens=1000, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(random_prompts(num_seqs, context, vocab=engine.vocab_size, seed=num_seqs)):
        engine.add_request(f"s{num_seqs}-{i}", prompt, params, adapters[i % len(adapters)] if adapters else None)
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running) \
            or engine.scheduler.num_waiting:
        engine.step()                                               # prefill
    runner, forward_times = engine.runner, []
    run = runner.run

    def timed_run(batch):
        t = time.perf_counter()
        out = run(batch)
        forward_times.append(time.perf_counter() - t)
        return out
    runner.run = timed_run
    step_times = []
    try:
        for _ in range(repeats + 2):
            t = time.perf_counter()
            engine.step()
            step_times.append(time.perf_counter() - t)
    finally:
        runner.run = run
        for rid in list(engine.requests):
            engine.abort_request(rid)
        engine.step()
    return statistics.median(forward_times[2:]), statistics.median(step_times[2:])


def load_loras(engine, model: str, count: int) -> list[str]:
    if not count:
        return []
    from bench.http import make_adapters
    dirs = make_adapters(engine.config.model, model, 64)
    names = sorted(n for n in dirs if n.startswith("lora"))[:count]
    for name in names:
        engine.adapters.load(name, dirs[name])
    return names


@contextlib.contextmanager
def torch_path():
    """The C kernels off: the module path with F.linear, decode attention gathering the blocks then calling SDPA,
    LoRA by the torch ops."""
    import server.model.attention as attention
    from kernels import decode_layers, lora_fused
    real = attention.pd.supports, lora_fused.supports, skinny_gemm.supports, decode_layers.supports
    attention.pd.supports = lora_fused.supports = skinny_gemm.supports = decode_layers.supports = lambda *a: False
    try:
        yield
    finally:
        attention.pd.supports, lora_fused.supports, skinny_gemm.supports, decode_layers.supports = real


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "llama-160m"])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--seqs", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--loras", type=int, default=0)
    ap.add_argument("--torch-path", action="store_true")
    args = ap.parse_args()
    from server.config import EngineConfig
    from server.default_model import ensure_default_model
    from server.engine import LLMEngine
    paths = {"llama-160m": lambda: str(llama_160m("float32")), "smollm2-135m": ensure_default_model}
    bandwidth = read_bandwidth()
    rows = []
    for model in args.models:
        for dtype in args.dtypes:
            engine = LLMEngine(EngineConfig(model=paths[model](), dtype=dtype, max_num_seqs=max(args.seqs),
                                            kv_cache_memory="512MiB"))
            adapters = load_loras(engine, model, args.loras)
            weights = linear_weights(engine.runner.model)
            weight_bytes = sum(w.numel() * w.element_size() for w in weights)
            for n in args.seqs:
                forward, step = decode_times(engine, n, args.context, args.repeats, adapters)
                mm = matmul_floor(weights, n, args.repeats)
                row = dict(model=model, dtype=dtype, seqs=n, loras=args.loras, weight_mb=weight_bytes / 1e6,
                           bandwidth_gb_s=bandwidth / 1e9, read_floor_ms=weight_bytes / bandwidth * 1e3,
                           matmul_ms=mm * 1e3, forward_ms=forward * 1e3, step_ms=step * 1e3)
                if args.torch_path:
                    with torch_path():
                        row["step_torch_ms"] = decode_times(engine, n, args.context, args.repeats,
                                                            adapters)[1] * 1e3
                emit(row)
                rows.append(row)
            del engine
    print(f"\nmachine: {machine()}; read bandwidth {bandwidth / 1e9:.1f} GB/s; decode steps with "
          f"{args.context}-token contexts, {args.loras} LoRA adapters, median of {args.repeats}\n")
    extra = " | step, torch path ms | that / matmul floor" if args.torch_path else ""
    print("| model | dtype | seqs | LoRA adapters | weights MB | read floor ms | matmul floor ms | forward ms | step ms "
          f"| step / read floor | step / matmul floor{extra} |")
    print("|---" * (11 + 2 * args.torch_path) + "|")
    for r in rows:
        torch_cols = (f" | {r['step_torch_ms']:.1f} | {r['step_torch_ms'] / r['matmul_ms']:.2f}x"
                      if args.torch_path else "")
        print(f"| {r['model']} | {r['dtype']} | {r['seqs']} | {r['loras']} | {r['weight_mb']:.0f} | {r['read_floor_ms']:.1f} | "
              f"{r['matmul_ms']:.1f} | {r['forward_ms']:.1f} | {r['step_ms']:.1f} | "
              f"{r['step_ms'] / r['read_floor_ms']:.2f}x | {r['step_ms'] / r['matmul_ms']:.2f}x{torch_cols} |")


if __name__ == "__main__":
    main()
