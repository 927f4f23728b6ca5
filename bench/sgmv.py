"""What LoRA adds to the linear layers of a model on CPU (kernels/cpu.py), for realistic shapes.

    python -m bench.sgmv [--dtype float32] [--rank 16] [--repeats 30] [--quick]

For each (token layout, H_out), a stack of NUM_LAYERS linear layers run back to back as in one model step
(each layer its own W and its own 64-slot LoRA stacks, so weights stream from memory as they do in a real
model), first base only, `out = x @ W.T` (W [H_out, H_in]), then with a LoRA delta added into each `out`:
  ours       `sgmv_expand(sgmv_shrink(x, A, seg), B, seg, out)` through `kernels` (the auto-picked path), with
             B [S, H_out, R] stored as adapters/lora_runtime.py stores it on CPU: a view of [S, R, H_out]
  b_cols     the same with B [S, H_out, R] contiguous (the layout before; what the Triton kernels take)
  loop       the CPU path forced to one matmul per segment
  batched    the CPU path forced to gathered weights + `bmm` for the short segments
  per_token  the naive way, A and B gathered for every token, then bmm (decode layouts only)
LoRA overhead = (stack with LoRA - base stack) / base stack. Timing whole stacks, not LoRA ops alone, keeps
threads, caches and the interpreter as warm or cold as in a real step (tiny ops on this VM cost 3x more after
an idle gap or a cache flush). Variants run interleaved, their order rotated each round; per-layer medians in
ms. One JSON line per point, then a markdown table and a summary. H_in = 1024; H_out 1024 (q/o), 512 (k/v),
2816 (gate or up), 5632 (fused gate_up); every segment has its own adapter (the worst case).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time

import torch

import kernels
from kernels import SegmentMeta, cpu

H_IN = 1024
H_OUTS = (1024, 512, 2816, 5632)
NUM_SLOTS = 64
NUM_LAYERS = 8  # distinct weight sets per point: > L3 (32 MiB on the EPYC VM this was tuned on) at every H_out
STRATEGIES = ("ours", "b_cols", "loop", "batched", "per_token")


def layouts() -> dict[str, list[int | None]]:
    """Per-token adapter slots (None: base model only). Slots are shuffled (the general case: each segment's
    weights must be gathered) except in the "slots in order" row (a view of the stack, no copy)."""
    slot = random.Random(0).sample(range(NUM_SLOTS), NUM_SLOTS)
    return {
        "decode T=64 1 seg": [slot[0]] * 64,
        "decode T=64 8 segs": [slot[s] for s in range(8) for _ in range(8)],
        "decode T=64 64 segs": [slot[s] for s in range(64)],
        "decode T=64 64 segs, slots in order": list(range(64)),
        "mixed T=576 512-chunk + 64 decodes": [slot[0]] * 512 + [slot[s] for s in range(1, 64)] + [None],
        "prefill T=2048 4 segs": [slot[s] for s in range(4) for _ in range(512)],
    }


def per_token(x, lora_a, lora_b, seg: SegmentMeta, out):
    """The naive way: gather each token's own A and B, batch over tokens."""
    rows, slots = seg.derived["per_token"]
    y = torch.bmm(x.index_select(0, rows).unsqueeze(1), lora_a.index_select(0, slots).transpose(1, 2))
    out.index_add_(0, rows, torch.bmm(y, lora_b.index_select(0, slots).transpose(1, 2)).squeeze(1))


def forced(max_gather_bytes: int):
    """The CPU path with the loop-vs-batched threshold pinned (0: always loop; huge: batch when short)."""
    def run(x, lora_a, lora_b, seg, out):
        saved, cpu.MAX_GATHER_BYTES = cpu.MAX_GATHER_BYTES, max_gather_bytes
        try:
            cpu.sgmv_expand(cpu.sgmv_shrink(x, lora_a, seg), lora_b, seg, out)
        finally:
            cpu.MAX_GATHER_BYTES = saved
    return run


LORA = {
    "ours": lambda x, a, b, seg, out: kernels.sgmv_expand(kernels.sgmv_shrink(x, a, seg), b, seg, out),
    "b_cols": lambda x, a, b, seg, out: kernels.sgmv_expand(kernels.sgmv_shrink(x, a, seg), b, seg, out),
    "loop": forced(0),
    "batched": forced(1 << 62),
    "per_token": per_token,
}


def time_point(fns: dict, repeats: int) -> dict[str, list[float]]:
    """ms of each fn per round after 3 warm-up rounds; the order of the fns rotates every round."""
    times = {name: [] for name in fns}
    names = list(fns)
    for i in range(repeats + 3):
        for name in names[i % len(names):] + names[:i % len(names)]:
            start = time.perf_counter()
            fns[name]()
            if i >= 3:
                times[name].append((time.perf_counter() - start) * 1e3)
    return times


def bench_point(name, token_slots, h_out, rank, dtype, repeats, gen) -> dict:
    seg = SegmentMeta.from_token_slots(token_slots)
    in_seg = [i for i, s in enumerate(token_slots) if s is not None]
    seg.derived["per_token"] = (torch.tensor(in_seg), torch.tensor([token_slots[i] for i in in_seg]))
    x = torch.randn(seg.num_tokens, H_IN, generator=gen).to(dtype)
    layers = [((torch.randn(h_out, H_IN, generator=gen) / H_IN ** 0.5).to(dtype),
               (torch.randn(NUM_SLOTS, rank, H_IN, generator=gen) / H_IN ** 0.5).to(dtype),
               (torch.randn(NUM_SLOTS, rank, h_out, generator=gen) / rank ** 0.5).to(dtype).transpose(1, 2))
              for _ in range(NUM_LAYERS)]
    b_cols = [lora_b.contiguous() for _, _, lora_b in layers]

    def stack(lora, contiguous_b=False):
        for (w, lora_a, lora_b), b_c in zip(layers, b_cols):
            out = x @ w.T
            if lora is not None:
                lora(x, lora_a, b_c if contiguous_b else lora_b, seg, out)

    strategies = [s for s in STRATEGIES if s != "per_token" or seg.num_tokens <= 64]  # it copies T x [H_out, R]
    fns = {"base": lambda: stack(None), **{s: (lambda s=s: stack(LORA[s], s == "b_cols")) for s in strategies}}
    ms = {k: statistics.median(v) / NUM_LAYERS for k, v in time_point(fns, repeats).items()}
    return {"layout": name, "num_tokens": seg.num_tokens, "num_segments": seg.num_segments, "h_in": H_IN,
            "h_out": h_out, "rank": rank, "dtype": str(dtype).removeprefix("torch."),
            **{f"{k}_ms": round(v, 4) for k, v in ms.items()},
            **{f"{s}_overhead_pct": round(100 * (ms[s] - ms["base"]) / ms["base"], 1) for s in strategies}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=30, help="timed rounds per point (T > 512: half)")
    parser.add_argument("--quick", action="store_true", help="H_out 1024 only, 5 rounds")
    args = parser.parse_args()
    dtype, rank = getattr(torch, args.dtype), args.rank
    h_outs, repeats = ((1024,), 5) if args.quick else (H_OUTS, args.repeats)
    print(f"# {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.dtype}, R={rank}, H_in={H_IN}", flush=True)
    gen = torch.Generator().manual_seed(0)
    records = []
    for name, token_slots in layouts().items():
        for h_out in h_outs:
            rounds = max(3, repeats // 2) if len(token_slots) > 512 else repeats
            records.append(bench_point(name, token_slots, h_out, rank, dtype, rounds, gen))
            print(json.dumps(records[-1]), flush=True)
    print("\n| layout | H_out | base ms/layer | with LoRA (ours) | overhead: ours | B [S, H_out, R] contiguous "
          "| loop | batched | per-token |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in records:
        pct = [f"{r[f'{s}_overhead_pct']}%" if f"{s}_overhead_pct" in r else "-" for s in STRATEGIES]
        print(f"| {r['layout']} | {r['h_out']} | {r['base_ms']:.3f} | {r['ours_ms']:.3f} | {' | '.join(pct)} |")
    ours = [r["ours_overhead_pct"] for r in records]
    print(f"\nsummary: LoRA (R={rank}, shrink+expand, {args.dtype}) adds {min(ours)}% to {max(ours)}% to the base "
          f"matmul, median {statistics.median(ours)}% over {len(ours)} points (medians of {repeats} rounds)",
          flush=True)


if __name__ == "__main__":
    main()
