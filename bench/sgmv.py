"""CPU SGMV (kernels/cpu.py) vs the base matmul it rides on, for realistic LoRA shapes.

    python -m bench.sgmv [--dtype float32] [--rank 16] [--repeats 40] [--quick]

For each (token layout, H_out): the base `x @ W.T` (W [H_out, H_in]) and one LoRA delta on the same x:
`y = sgmv_shrink(x, A); sgmv_expand(y, B, out)` through `kernels` (the auto-picked CPU path), plus the
two CPU strategies forced (one matmul per segment "loop"; gathered weights + `bmm` "batched") and the naive
per-token gather ("per_token": A[slot of each token], B[slot of each token], bmm; decode only) for context. Variants are
timed round-robin within a point so machine noise hits them alike; medians in ms. One JSON line per point,
then a markdown table. H_in = 1024; H_out 1024 (q/o), 512 (k/v), 2816 and 5632 (down/up, fused gate_up).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

import kernels
from kernels import SegmentMeta, cpu

H_IN = 1024
H_OUTS = (1024, 512, 2816, 5632)
NUM_SLOTS = 64


def layouts() -> dict[str, list[int | None]]:
    """Per-token adapter slots; every segment has its own adapter (the worst case for grouping)."""
    return {
        "decode T=64 1 seg": [0] * 64,
        "decode T=64 8 segs": [s for s in range(8) for _ in range(8)],
        "decode T=64 64 segs": list(range(64)),
        "mixed T=576 512-chunk + 64 decodes": [0] * 512 + list(range(1, 64)) + [None],
        "prefill T=2048 4 segs": [s for s in range(4) for _ in range(512)],
    }


def per_token(x, lora_a, lora_b, out, token_slots: torch.Tensor, rows: torch.Tensor):
    """The naive way: gather each token's own A and B, batch over tokens."""
    xs = x.index_select(0, rows).unsqueeze(1)  # [n, 1, H_in]
    y = torch.bmm(xs, lora_a.index_select(0, token_slots).transpose(1, 2))  # [n, 1, R]
    delta = torch.bmm(y, lora_b.index_select(0, token_slots).transpose(1, 2)).squeeze(1)
    out.index_add_(0, rows, delta)


def forced(max_gather_bytes: int):
    """Run the CPU path with the loop-vs-batched threshold pinned (0: always loop; huge: batch when short)."""
    def run(x, lora_a, lora_b, seg, out):
        saved, cpu.MAX_GATHER_BYTES = cpu.MAX_GATHER_BYTES, max_gather_bytes
        try:
            cpu.sgmv_expand(cpu.sgmv_shrink(x, lora_a, seg), lora_b, seg, out)
        finally:
            cpu.MAX_GATHER_BYTES = saved
    return run


def time_point(fns: dict, repeats: int) -> dict[str, float]:
    """Median ms of each fn, interleaved round-robin after 3 warm-up rounds."""
    times = {name: [] for name in fns}
    for i in range(repeats + 3):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if i >= 3:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=40, help="timed rounds per point (prefill: a quarter)")
    parser.add_argument("--quick", action="store_true", help="H_out 1024 only, 5 rounds")
    args = parser.parse_args()
    dtype, rank = getattr(torch, args.dtype), args.rank
    h_outs, repeats = ((1024,), 5) if args.quick else (H_OUTS, args.repeats)
    print(f"# {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.dtype}, R={rank}, H_in={H_IN}", flush=True)
    gen = torch.Generator().manual_seed(0)
    lora_a = (torch.randn(NUM_SLOTS, rank, H_IN, generator=gen) / H_IN ** 0.5).to(dtype)
    rows_out = []
    for name, token_slots in layouts().items():
        seg = SegmentMeta.from_token_slots(token_slots)
        x = torch.randn(seg.num_tokens, H_IN, generator=gen).to(dtype)
        in_seg = [i for i, s in enumerate(token_slots) if s is not None]
        rows = torch.tensor(in_seg)
        slots_of_rows = torch.tensor([token_slots[i] for i in in_seg])
        for h_out in h_outs:
            w = (torch.randn(h_out, H_IN, generator=gen) / H_IN ** 0.5).to(dtype)
            lora_b = (torch.randn(NUM_SLOTS, h_out, rank, generator=gen) / rank ** 0.5).to(dtype)
            out = torch.zeros(seg.num_tokens, h_out, dtype=dtype)
            y = kernels.sgmv_shrink(x, lora_a, seg)
            fns = {
                "base": lambda: x @ w.T,
                "lora": lambda: kernels.sgmv_expand(kernels.sgmv_shrink(x, lora_a, seg), lora_b, seg, out),
                "shrink": lambda: kernels.sgmv_shrink(x, lora_a, seg),
                "expand": lambda: kernels.sgmv_expand(y, lora_b, seg, out),
                "loop": lambda: forced(0)(x, lora_a, lora_b, seg, out),
                "batched": lambda: forced(1 << 62)(x, lora_a, lora_b, seg, out),
            }
            if seg.num_tokens <= 64:  # it copies [T, H_out, R] weights: hopeless for prefill
                fns["per_token"] = lambda: per_token(x, lora_a, lora_b, out, slots_of_rows, rows)
            ms = time_point(fns, max(3, repeats // 4) if seg.num_tokens > 512 else repeats)
            record = {"layout": name, "num_tokens": seg.num_tokens, "num_segments": seg.num_segments,
                      "h_in": H_IN, "h_out": h_out, "rank": rank, "dtype": args.dtype,
                      **{f"{k}_ms": round(v, 4) for k, v in ms.items()},
                      "lora_pct_of_base": round(100 * ms["lora"] / ms["base"], 1)}
            print(json.dumps(record), flush=True)
            rows_out.append(record)
    print("\n| layout | H_out | base ms | ours ms (shrink+expand) | % of base | loop ms | batched ms | per-token ms |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows_out:
        print(f"| {r['layout']} | {r['h_out']} | {r['base_ms']:.3f} | {r['lora_ms']:.3f} | {r['lora_pct_of_base']}% "
              f"| {r['loop_ms']:.3f} | {r['batched_ms']:.3f} | {r.get('per_token_ms', '-')} |")
    pct = [r["lora_pct_of_base"] for r in rows_out]
    print(f"\nsummary: LoRA delta (R={rank}) costs {min(pct)}-{max(pct)}% of the base matmul, "
          f"median {statistics.median(pct)}% over {len(pct)} points", flush=True)


if __name__ == "__main__":
    main()
