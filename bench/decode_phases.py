"""Where a decode step's time goes inside kernels/decode_layers (the small-batch driver), phase by phase.

    python -m bench.decode_phases [--model smollm2-135m] [--dtype bfloat16] [--seqs 1] [--contexts 8 64 1024]
                                  [--repeats 40] [--rounds 2] [--cflags=-DAHEAD=4]

Builds the kernel with -DPHASE_TIMES (its own cache entry; the served build has no timing in it) and any --cflags,
runs decode steps (bench/step_floor.py's decode_times: sequences with --context tokens in their KV cache, one new
token each), and prints per step the milliseconds thread 0 spent from the end of one phase to the end of the next
(barriers included), next to the whole step and the read floor (linear weight bytes / read bandwidth). The
matmul phases are the weight stream; the rest is what the stack adds to it.
"""
from __future__ import annotations

import argparse
import ctypes

from bench.common import machine

PHASES = ["embed", "qkv", "attention items", "attention merge", "o", "norm", "gate_up", "silu", "down",
          "residual + norm", "lm_head", "argmax", "lora"]       # kernels/decode_layers.c PH_* order


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", choices=["smollm2-135m", "llama-160m"])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--seqs", type=int, default=1)
    ap.add_argument("--contexts", nargs="+", type=int, default=[8, 64, 1024])
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cflags", nargs="*", default=[], help="extra compiler flags for the kernel, e.g. --cflags=-DAHEAD=4")
    args = ap.parse_args()
    from kernels import native
    native.FLAGS = native.FLAGS + ("-DPHASE_TIMES", *args.cflags)     # before the kernel is first loaded
    from bench.common import llama_160m
    from bench.step_floor import decode_times, linear_weights, read_bandwidth
    from server.config import EngineConfig
    from server.default_model import ensure_default_model
    from server.engine import LLMEngine
    path = ensure_default_model() if args.model == "smollm2-135m" else str(llama_160m("float32"))
    engine = LLMEngine(EngineConfig(model=path, dtype=args.dtype, max_num_seqs=max(args.seqs, 1),
                                    kv_cache_memory="512MiB"))
    weight_bytes = sum(w.numel() * w.element_size() for w in linear_weights(engine.runner.model))
    seconds = (ctypes.c_double * len(PHASES)).in_dll(native.load("decode_layers"), "phase_seconds")
    decode_times(engine, args.seqs, 8, 5)                                   # warm up (and build the kernel)
    rows = []
    for context in args.contexts:
        for _ in range(args.rounds):
            for i in range(len(PHASES)):
                seconds[i] = 0.0
            step = decode_times(engine, args.seqs, context, args.repeats)[1]
            steps = args.repeats + 3                # decode_times' timed steps, two warm-up ones and the last abort
            phases = [seconds[i] * 1e3 / steps for i in range(len(PHASES))]
            rows.append(dict(context=context, step=step * 1e3, kernel=sum(phases), phases=phases))
    floor = weight_bytes / read_bandwidth() * 1e3
    print(f"\nmachine: {machine()}; {args.model} {args.dtype}, {args.seqs} sequences, {args.repeats} decode steps a "
          f"round; read floor {floor:.2f} ms ({weight_bytes / 1e6:.0f} MB); extra flags: {' '.join(args.cflags) or '-'}\n")
    print("| context | step ms | kernel ms | " + " | ".join(PHASES) + " |")
    print("|---" * (3 + len(PHASES)) + "|")
    for r in rows:
        print(f"| {r['context']} | {r['step']:.2f} | {r['kernel']:.2f} | " +
              " | ".join(f"{v:.3f}" for v in r["phases"]) + " |")


if __name__ == "__main__":
    main()
