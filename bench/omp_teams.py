"""One OpenMP team or two: the same decode steps, with the model loaded on different threads.

    python -m bench.omp_teams [--model llama-160m] [--cases base lora64] [--steps 12] [--waves 3]

The server steps its engine on a thread of its own. Before kernels/cpu_threads.py the main thread loaded the
model, which left it an OpenMP team (libgomp keeps one per thread that ran a parallel op, for the thread's
life); with two teams on a machine with as many CPUs as one team has threads, libgomp stops spinning between
parallel regions and every small op of a step sleeps and wakes its workers. Each setting runs in a fresh
process: 32 requests of 32 prompt tokens decode `--steps` tokens; reported is the median decode step (32
sequences) over `--waves` waves after one warm-up wave.
  main         load and step on the main thread (the offline engine, bench/throughput.py)
  main-loads   load on the main thread, step on another thread (the server before the fix)
  passing      load on a thread that ends (kernels/cpu_threads.call), step on another (the server now)
Cases: base (no adapter), lora8 / lora64 (request i on LoRA adapter i mod 8 / 64: r 16 on all 7 linears).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from bench.common import machine

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = ["main", "main-loads", "passing"]


def child(setting: str, model: str, case: str, steps: int, waves: int) -> dict:
    import statistics
    import threading
    import time

    from bench.http import case_names, make_adapters, model_dir, offline_engine, prompts_for
    from kernels import cpu_threads
    from server.sampling import SamplingParams

    def load():
        class Args:
            dtype, concurrency, kv_cache_memory = "float32", 32, "1GiB"
        base = model_dir(model)
        return offline_engine(base, model, make_adapters(base, model, 64), Args), prompts_for(model, base, 32, 32)

    def run(engine, prompts) -> list[float]:
        names = case_names(case, 32, model)
        medians = []
        for wave in range(waves + 1):
            for i, (prompt, name) in enumerate(zip(prompts, names)):
                engine.add_request(f"w{wave}-{i}", prompt, SamplingParams(max_tokens=steps, temperature=0.0,
                                                                          ignore_eos=True),
                                   None if name == model else name)
            times = []
            while engine.has_unfinished():
                start = time.perf_counter()
                engine.step()
                times.append(time.perf_counter() - start)
            if wave:                               # wave 0 warms up; each wave's first step is the prefill
                medians.append(statistics.median(times[1:]) * 1e3)
        return medians

    if setting == "main":
        return {"step_ms": run(*load())}
    loaded = load() if setting == "main-loads" else cpu_threads.call(load)
    out = {}
    stepper = threading.Thread(target=lambda: out.update(step_ms=run(*loaded)))
    stepper.start()
    stepper.join()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-160m")
    ap.add_argument("--cases", nargs="+", default=["base", "lora64"])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--waves", type=int, default=3)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        setting, case = args.child.split(":")
        print(json.dumps(child(setting, args.model, case, args.steps, args.waves)))
        return
    load = os.getloadavg()[0]
    rows = []
    for case in args.cases:
        for setting in SETTINGS:
            cmd = [sys.executable, "-m", "bench.omp_teams", "--model", args.model, "--steps", str(args.steps),
                   "--waves", str(args.waves), "--child", f"{setting}:{case}"]
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
            rows.append((case, setting, json.loads(done.stdout.strip().splitlines()[-1])["step_ms"]))
    print(f"\nmachine: {machine()}; load average at start {load:.2f}, at end {os.getloadavg()[0]:.2f}; "
          f"{args.model}, fp32, decode steps of 32 sequences, median per wave\n")
    print("| case | setting | decode step ms (each wave) | vs main |")
    print("|---|---|---|---|")
    ref = {}
    for case, setting, ms in rows:
        best = min(ms)
        ref.setdefault(case, best)
        print(f"| {case} | {setting} | {' / '.join(f'{m:.1f}' for m in ms)} | {best / ref[case]:.2f}x |")


if __name__ == "__main__":
    main()
