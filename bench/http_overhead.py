"""What serving over HTTP adds to one request's decode: the same request offline and through the server, in turns,
and the server's CPU per generated token, thread by thread.

    python -m bench.http_overhead [--dtype bfloat16] [--rounds 6] [--output-len 64]

One `peftserve serve` process (SmolLM2-135M-Instruct, no adapters) and, in this process, an LLMEngine with the
same model and dtype. Each round: two chat-templated requests (bench/http.py's prompts, greedy, `ignore_eos`)
decoded offline one after the other, timed from the first decode step to the last; then the same two streamed
through the server one at a time (TPOT as the client sees it). Rounds alternate which goes first, so the
machine's drift (its memory speed moves by 10-20% within minutes) falls on both. Then eight requests of
`--output-len` x 2 tokens through the server while its threads' CPU time (/proc/PID/task/*/stat, user + system)
is read before and after: the event loop's per-token CPU is what it takes from the two cores the decode kernel
runs on.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time

from bench import http
from bench.common import machine
from bench.http_client import closed_loop, request_body


def offline_tpot(engine, prompt: list[int], output_len: int) -> float:
    """Seconds per token between the first and the last decode step of one request alone in the engine."""
    from server.sampling import SamplingParams
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    engine.add_request(f"offline-{time.perf_counter_ns()}", prompt, params, None)
    stamps = []
    while engine.has_unfinished():
        engine.step()
        stamps.append(time.perf_counter())
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def thread_cpu(pid: int) -> dict[tuple[str, str], float]:
    """(thread id, name) -> CPU seconds (user + system) of each thread of process `pid`."""
    out, tick = {}, os.sysconf("SC_CLK_TCK")
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = open(f"/proc/{pid}/task/{tid}/stat").read()
        except OSError:
            continue
        name, fields = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        out[(tid, name)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def start(base: str, dtype: str) -> tuple[subprocess.Popen, int]:
    port = http.free_port()
    cmd = [sys.executable, "-m", "server.cli", "serve", "--model", base, "--served-model-name", "m", "--dtype", dtype,
           "--port", str(port), "--log-level", "warning", "--no-demo-adapters"]
    env = {**os.environ, "PYTHONPATH": str(http.ROOT)}
    child = subprocess.Popen(cmd, cwd=http.ROOT, env=env, stdout=subprocess.DEVNULL)
    return http.wait_healthy(child, port, 600, "server"), port


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--output-len", type=int, default=64)
    args = ap.parse_args()
    from server.config import EngineConfig
    from server.engine import LLMEngine
    base = http.model_dir("smollm2-135m")
    prompts = http.prompts_for("smollm2-135m", base, 8, 80)
    engine = LLMEngine(EngineConfig(model=base, served_model_name="m", dtype=args.dtype, max_num_seqs=1,
                                    kv_cache_memory="1GiB"))
    offline_tpot(engine, prompts[0], 8)                                   # warm up
    child, port = start(base, args.dtype)
    rounds = []
    try:
        asyncio.run(closed_loop(port, [request_body("m", prompts[0], 8)], 1))
        for r in range(args.rounds):
            def offline():
                return statistics.mean(offline_tpot(engine, p, args.output_len) for p in prompts[:2])

            def served():
                time.sleep(0.05)                                            # the offline team stops spinning
                out = asyncio.run(closed_loop(port, [request_body("m", p, args.output_len) for p in prompts[:2]], 1))
                return statistics.mean(x["tpot"] for x in out)
            first, second = (offline, served) if r % 2 == 0 else (served, offline)
            a, b = first(), second()
            off, on = (a, b) if r % 2 == 0 else (b, a)
            rounds.append((off, on))
            print(f"round {r}: offline {off * 1e3:.2f} ms, HTTP {on * 1e3:.2f} ms, HTTP / offline {on / off:.3f}",
                  flush=True)
        before = thread_cpu(child.pid)
        out = asyncio.run(closed_loop(port, [request_body("m", p, 2 * args.output_len) for p in prompts], 1))
        after = thread_cpu(child.pid)
        tokens = sum(x["tokens"] for x in out)
    finally:
        http.stop_server(child)
    ratios = [on / off for off, on in rounds]
    print(f"\nmachine: {machine()}; smollm2-135m {args.dtype}, one request at a time, {args.output_len} tokens\n")
    print("| offline TPOT ms, median | HTTP TPOT ms, median | HTTP / offline per round: median (min - max) |")
    print("|---|---|---|")
    print(f"| {statistics.median(o for o, _ in rounds) * 1e3:.2f} | {statistics.median(h for _, h in rounds) * 1e3:.2f} "
          f"| {statistics.median(ratios):.3f} ({min(ratios):.3f} - {max(ratios):.3f}) |")
    print(f"\nserver CPU per generated token over {tokens} tokens (8 requests), by thread:\n")
    print("| thread | CPU ms per token |")
    print("|---|---|")
    for key in sorted(after, key=lambda k: -(after[k] - before.get(k, 0.0))):
        spent = after[key] - before.get(key, 0.0)
        if spent > 0:
            label = "main: event loop" if key[0] == str(child.pid) else key[1]
            print(f"| {label} ({key[0]}) | {spent / tokens * 1e3:.3f} |")


if __name__ == "__main__":
    main()
