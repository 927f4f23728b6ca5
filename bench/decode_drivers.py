"""The decode stack's two drivers on whole decode steps, by batch size: which one a step of that many rows wants.

    python -m bench.decode_drivers [--model smollm2-135m] [--seqs 16 24 32 48 64] [--steps 30]

kernels/decode_layers runs a decode step in one of two ways: up to kernels/skinny_gemm.MAX_ROWS rows one OpenMP
region for the whole stack with the matmuls by the small-batch kernel (kernels/skinny.h), beyond it each phase
its own region and the matmuls by torch's BLAS. For each --seqs S: two engines (base model; 8 LoRA adapters
round robin, r=16 on all seven linears, bench/http.py's), S sequences each decoding past their ~80-token chat
prompts, stepped in turns with the driver forced each way (MAX_ROWS set to S, then below S); per step the decode
kernel's time, median over --steps, and the median ratio over step pairs (small-batch / BLAS). fp32.
"""
from __future__ import annotations

import argparse
import statistics
import types

import torch

from bench import http
from bench.common import machine
from bench.lora_steps import add, kernel_timer


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", choices=["smollm2-135m", "llama-160m"])
    ap.add_argument("--seqs", nargs="+", type=int, default=[16, 24, 32, 48, 64])
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    from kernels import skinny_gemm
    limits = skinny_gemm.MAX_ROWS
    default = limits[torch.float32]
    settings = types.SimpleNamespace(dtype="float32", concurrency=max(args.seqs), kv_cache_memory="1GiB")
    base = http.model_dir(args.model)
    dirs = {k: v for k, v in http.make_adapters(base, args.model, 64).items() if k < "lora008"}
    calls = kernel_timer()
    rows = []
    try:
        for s in args.seqs:
            prompts = http.prompts_for(args.model, base, s, 80)
            engines = {}
            for case in ("base", "lora8"):
                engine = engines[case] = http.offline_engine(base, args.model, dirs, settings, prefix_caching=False)
                add(engine, prompts, http.case_names(case, s, args.model), args.model, f"{case}-{s}",
                    2 * args.steps + 10)
                for _ in range(4):
                    engine.step()
            times = {}
            for _ in range(args.steps):
                for case, engine in engines.items():
                    for driver, limit in (("small-batch", s), ("BLAS", s - 1)):
                        limits[torch.float32] = limit
                        calls.clear()
                        engine.step()
                        times.setdefault((case, driver), []).append(sum(calls))
            limits[torch.float32] = default
            for case in engines:
                small, blas = times[(case, "small-batch")], times[(case, "BLAS")]
                rows.append((s, case, statistics.median(small) * 1e3, statistics.median(blas) * 1e3,
                             statistics.median(a / b for a, b in zip(small, blas))))
                print(rows[-1], flush=True)
            del engines
    finally:
        limits[torch.float32] = default
    print(f"\nmachine: {machine()}; {args.model} fp32, decode kernel ms per step, median of {args.steps}; "
          f"MAX_ROWS[float32] here: {default}\n")
    print("| sequences | case | small-batch driver ms | BLAS driver ms | small-batch / BLAS |")
    print("|---|---|---|---|---|")
    for s, case, small, blas, ratio in rows:
        print(f"| {s} | {case} | {small:.1f} | {blas:.1f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
