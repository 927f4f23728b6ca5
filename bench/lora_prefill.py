"""LoRA in prefill-sized steps: the C kernel (kernels/lora_fused) against the torch path's per-segment GEMMs.

    python -m bench.lora_prefill [--dtype float32] [--rounds 15]

One decoder layer's four LoRA linears (fused qkv, o, fused gate_up, down; r=16 on every slice, 8 adapters) with
SmolLM2-135M's widths (hidden 576, kv 192, intermediate 1536), for three prefill layouts: 32 prompts of 80 tokens
(bench/http.py's 32-concurrent wave), 4 chunks of 512 and one of 2048, each prompt its adapter round-robin. Per
layout, per layer, median ms of:
  base       the four base matmuls (x @ W.T), for scale
  torch      kernels.sgmv_shrink + sgmv_expand per slice (adapters/lora_runtime.py's path where the kernel does
             not apply: DoRA, GPU)
  C          kernels.lora_fused on the segments as they are
  C blocked  the same on lora_fused.blocked(segments): long segments cut into BLOCK-row pieces (what the runtime
             calls)
Variants run interleaved, their order rotated each round. LoRA overhead = variant / base.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import kernels
from bench.common import machine
from kernels import lora_fused as lf
from kernels.segments import SegmentMeta

HIDDEN, KV, INTER, RANK, ADAPTERS = 576, 192, 1536, 16, 8
LINEARS = {"qkv": (HIDDEN, [HIDDEN, KV, KV]), "o": (HIDDEN, [HIDDEN]), "gate_up": (HIDDEN, [INTER, INTER]),
           "down": (INTER, [HIDDEN])}
LAYOUTS = {"32 x 80": (32, 80), "4 x 512": (4, 512), "1 x 2048": (1, 2048)}


def layer(dtype: torch.dtype, num_tokens: int, seed: int = 0):
    """(name, x, W, A stack, torch B stacks, column offsets, lora_fused.Slices, y) per linear."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for name, (h_in, widths) in LINEARS.items():
        r_total = RANK * len(widths)
        x = torch.randn(num_tokens, h_in, generator=g).to(dtype)
        w = (torch.randn(sum(widths), h_in, generator=g) * 0.05).to(dtype)
        a = (torch.randn(ADAPTERS, r_total, h_in, generator=g) * 0.05).to(dtype)
        b_t = [(torch.randn(ADAPTERS, RANK, width, generator=g) * 0.05).to(dtype) for width in widths]
        cols = [sum(widths[:i]) for i in range(len(widths))]
        sl = lf.slices([(b, RANK * i, RANK * (i + 1), cols[i]) for i, b in enumerate(b_t)])
        out.append((name, x, w, a, b_t, cols, sl, torch.zeros(num_tokens, sum(widths), dtype=dtype)))
    return out


def variants(linears, seg: SegmentMeta):
    def base():
        for _, x, w, _, _, _, _, y in linears:
            torch.mm(x, w.T, out=y)

    def torch_path():
        for _, x, _, a, b_t, cols, _, y in linears:
            shrunk = kernels.sgmv_shrink(x, a, seg)
            for i, (b, col) in enumerate(zip(b_t, cols)):
                kernels.sgmv_expand(shrunk[:, RANK * i:RANK * (i + 1)], b.transpose(1, 2), seg, y, col)

    def fused(cut):
        def run():
            for _, x, _, a, _, _, sl, y in linears:
                lf.lora_fused(x, a, sl, cut, y)
        return run
    return {"base": base, "torch": torch_path, "C": fused(seg), "C blocked": fused(lf.blocked(seg))}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    assert lf.available(), "the C kernel did not build"
    print(f"machine: {machine()}; {args.dtype}, SmolLM2-135M widths, r={RANK}, {ADAPTERS} adapters\n")
    print("| prefill layout | base ms | torch ms (overhead) | C ms (overhead) | C blocked ms (overhead) |")
    print("|---|---|---|---|---|")
    for label, (count, length) in LAYOUTS.items():
        num_tokens = count * length
        seg = SegmentMeta.from_segments([i * length for i in range(count)], [length] * count,
                                        [i % ADAPTERS for i in range(count)], num_tokens)
        runs = variants(layer(dtype, num_tokens), seg)
        names = list(runs)
        times = {name: [] for name in names}
        for r in range(args.rounds + 1):                  # round 0 warms up
            for name in names[r % len(names):] + names[:r % len(names)]:
                start = time.perf_counter()
                runs[name]()
                if r:
                    times[name].append(time.perf_counter() - start)
        ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        cells = [f"{ms[name]:.2f} ({ms[name] / ms['base']:.1%})" for name in names[1:]]
        print(f"| {label} | {ms['base']:.1f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
