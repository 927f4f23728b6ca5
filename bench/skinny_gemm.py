"""The small-batch GEMM (kernels/skinny_gemm.c) against F.linear on one model's weights, by row count.

    python -m bench.skinny_gemm [--model smollm2-135m] [--rows 1 2 4 8 16 32] [--repeats 7]

For each dtype and row count: the time to multiply that many rows by every linear weight of the model in layer
order (each weight streams from memory, as in a decode step), median of --repeats, by F.linear and by the kernel;
this picks kernels/skinny_gemm.MAX_ROWS. Prints JSON lines and a markdown table.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from bench.common import emit, machine
from kernels import skinny_gemm

MODELS = {    # (hidden, intermediate, q + 2 kv width, layers, vocab)
    "smollm2-135m": (576, 1536, 960, 30, 49152),
    "llama-160m": (1024, 4096, 3072, 8, 32000),
}


def weights(model: str, dtype: torch.dtype) -> list[torch.Tensor]:
    hidden, inter, qkv, layers, vocab = MODELS[model]
    shapes = [(qkv, hidden), (hidden, hidden), (2 * inter, hidden), (hidden, inter)] * layers + [(vocab, hidden)]
    return [(torch.randn(n, k) / k ** 0.5).to(dtype) for n, k in shapes]


def time_all(fn, ws, rows: int, repeats: int) -> float:
    xs = {w.shape[1]: torch.randn(rows, w.shape[1]).to(ws[0].dtype) for w in ws}
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 2):
            t = time.perf_counter()
            for w in ws:
                fn(xs[w.shape[1]], w)
            times.append(time.perf_counter() - t)
    return statistics.median(times[2:])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", choices=list(MODELS))
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--rows", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    assert skinny_gemm.available(), "the C kernel did not build (kernels/native.py)"
    rows = []
    for name in args.dtypes:
        ws = weights(args.model, getattr(torch, name))
        mb = sum(w.numel() * w.element_size() for w in ws) / 1e6
        for m in args.rows:
            blas = time_all(F.linear, ws, m, args.repeats)
            ours = time_all(skinny_gemm.skinny_gemm, ws, m, args.repeats)
            row = dict(model=args.model, dtype=name, rows=m, weight_mb=mb, f_linear_ms=blas * 1e3,
                       skinny_ms=ours * 1e3, skinny_gb_s=mb / ours / 1e3)
            emit(row)
            rows.append(row)
    print(f"\nmachine: {machine()}; {args.model} linear weights, median of {args.repeats}\n")
    print("| dtype | rows | weights MB | F.linear ms | skinny_gemm ms | skinny GB/s | F.linear / skinny |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dtype']} | {r['rows']} | {r['weight_mb']:.0f} | {r['f_linear_ms']:.1f} | {r['skinny_ms']:.1f} | "
              f"{r['skinny_gb_s']:.1f} | {r['f_linear_ms'] / r['skinny_ms']:.2f}x |")


if __name__ == "__main__":
    main()
