"""The small-batch GEMM (kernels/skinny_gemm.c) against F.linear on one model's weights, by row count.

    python -m bench.skinny_gemm [--model smollm2-135m] [--rows 1 2 4 8 16 32] [--repeats 7]

For each dtype and row count: the time to multiply that many rows by every linear weight of the model in layer
order (each weight streams from memory, as in a decode step), median of --repeats, by F.linear and by the kernel;
this picks kernels/skinny_gemm.MAX_ROWS. fp32 also with the weights packed once ahead of time for the BLAS
(torch.ops.mkl._mkl_reorder_linear_weight / _mkl_linear, what torch's compiler uses for fp32 linears on the CPU;
where the build has them): below ~128 rows F.linear's BLAS packs every weight on every call, a copy of all the
weights per decode step. GFLOPS = 2 x rows x weight elements / time. Prints JSON lines and a markdown table.
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


def packed_time(ws, rows: int, repeats: int) -> float | None:
    """time_all for the BLAS on weights packed for `rows` rows beforehand (fp32, where torch has the ops); the
    packed copies are checked against F.linear on one weight of each shape, and their size printed."""
    if ws[0].dtype != torch.float32 or not (torch._C.has_mkl and hasattr(torch.ops.mkl, "_mkl_linear")):
        return None
    packed = {id(w): torch.ops.mkl._mkl_reorder_linear_weight(w, rows) for w in ws}

    def linear(x, w):
        return torch.ops.mkl._mkl_linear(x, packed[id(w)], w, None, rows)
    for w in {w.shape: w for w in ws}.values():
        x = torch.randn(rows, w.shape[1])
        torch.testing.assert_close(linear(x, w), F.linear(x, w), atol=1e-4, rtol=1e-4)
    size = sum(p.numel() * p.element_size() for p in packed.values())
    print(f"packed for {rows} rows: {size / 1e6:.0f} MB allocated for {sum(w.numel() * 4 for w in ws) / 1e6:.0f} MB "
          f"of weights", flush=True)
    return time_all(linear, ws, rows, repeats)


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
            packed = packed_time(ws, m, args.repeats)
            row = dict(model=args.model, dtype=name, rows=m, weight_mb=mb, f_linear_ms=blas * 1e3,
                       skinny_ms=ours * 1e3, skinny_gb_s=mb / ours / 1e3, packed_ms=packed and packed * 1e3,
                       f_linear_gflops=2 * m * mb / 4e3 / blas if name == "float32" else None)
            emit(row)
            rows.append(row)
    print(f"\nmachine: {machine()}; {args.model} linear weights, median of {args.repeats}\n")
    print("| dtype | rows | weights MB | F.linear ms | skinny_gemm ms | skinny GB/s | F.linear / skinny "
          "| F.linear GFLOPS | MKL packed ms (GFLOPS) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        flops = f"{r['f_linear_gflops']:.0f}" if r["f_linear_gflops"] else ""
        packed = (f"{r['packed_ms']:.1f} ({r['f_linear_gflops'] * r['f_linear_ms'] / r['packed_ms']:.0f})"
                  if r["packed_ms"] else "")
        print(f"| {r['dtype']} | {r['rows']} | {r['weight_mb']:.0f} | {r['f_linear_ms']:.1f} | {r['skinny_ms']:.1f} | "
              f"{r['skinny_gb_s']:.1f} | {r['f_linear_ms'] / r['skinny_ms']:.2f}x | {flops} | {packed} |")


if __name__ == "__main__":
    main()
