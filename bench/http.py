"""End to end over HTTP: the real `peftserve serve` process, closed loop and open loop, next to the engine offline.

    python -m bench.http [--models llama-160m smollm2-135m] [--cases base lora8 lora64 mixed]
                         [--requests 96] [--concurrency 32] [--rates 0.5 0.9] [--dtype float32]
                         [--turns 3] [--shared-prefix]

For each model one server process (`python -m server.cli serve`, adapters preloaded with --adapter) and, in this
process, one offline LLMEngine with the same settings. Every case sends the same greedy requests (token-id
prompts, `ignore_eos`, fixed output length) for one model name per request:
  base      every request for the base model
  lora8     request i for LoRA adapter i mod 8 (r=16 on all 7 linears, random A and B, made with peft)
  lora64    request i for LoRA adapter i mod 64
  mixed     request i for base / LoRA / DoRA / prefix tuning / prompt tuning, round robin
Closed loop: --concurrency clients, each sending its next request when the previous one ends (streamed, so
TTFT and TPOT are seen as the client sees them). Open loop: Poisson arrivals at each --rates fraction of the
case's closed-loop request rate. Offline: all requests added to the engine at once (max_num_seqs =
--concurrency, so the same batch size), stepped to completion. Reported: output tok/s, TTFT and TPOT p50 / p99,
HTTP / offline. With --concurrency 1 also each case's TPOT against the weight-read floor (linear weight bytes / the
read bandwidth): the requests then go one by one with the bandwidth measured after each (best of 3 sums over
1 GiB on huge pages, the server idle), so that a request is compared with the memory speed of its moment (this
machine's moves by 20% within minutes), and again at the end of the run (bench/step_floor.py's read_bandwidth, best
of 5; also on 4 KiB pages, the floor before the served weights moved to huge pages).
--turns N then runs every case's closed loop N more rounds over HTTP and offline in turns (cases and HTTP /
offline in rotating order, the server idle while the engine in this process runs) and reports each ratio (case /
base, HTTP / offline) per round, median and range: this machine's speed drifts 20-50% within minutes, so ratios
of runs minutes apart say more about the drift than about the server.
--shared-prefix adds the shared-system-prompt workload: every prompt starts with the same ~1k-token system prompt,
request i for LoRA adapter i mod 8, with automatic prefix caching on and off (one server each).

The client (bench/http_client.py) is a minimal asyncio HTTP/1.1 client (keep-alive, chunked SSE read without
per-event JSON parsing), so the load generator takes little of the CPU the server needs on a small machine.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import CACHE, emit, llama_160m, machine
from bench.http_client import Connection, closed_loop, open_loop, request_body  # noqa: F401 (re-exported)

ROOT = Path(__file__).resolve().parent.parent
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis briefly.",
             "How do I sort a list in Python?", "Name three prime numbers.", "Why is the sky blue?",
             "Give me a recipe for pancakes.", "What does a CPU cache do?", "Summarise the plot of Hamlet.",
             "How far is the Moon from the Earth?", "What is a linked list?", "Tell me a joke about cats."]


# ---- models and adapters -----------------------------------------------------------------------------------------
def model_dir(name: str) -> str:
    if name == "llama-160m":
        return str(llama_160m("float32"))
    from server.default_model import ensure_default_model
    return ensure_default_model()


def make_adapters(base: str, tag: str, num_lora: int) -> dict[str, str]:
    """name -> directory: lora000..lora{num_lora-1} and one each of dora, prefix, prompt (made once, cached)."""
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig
    from tests.peft_fixtures import save_adapter
    root = CACHE / f"http-adapters-{tag}"
    configs = {f"lora{i:03d}": LoraConfig(r=16, lora_alpha=32, target_modules=list(LINEARS))
               for i in range(num_lora)}
    configs["dora"] = LoraConfig(r=16, lora_alpha=32, target_modules=list(LINEARS), use_dora=True)
    configs["prefix"] = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=16)
    configs["prompt"] = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=16)
    dirs = {}
    for i, (name, config) in enumerate(configs.items()):
        path = root / name
        if not (path / "adapter_config.json").exists():
            save_adapter(Path(base), config, path, seed=1000 + i)
        dirs[name] = str(path)
    return dirs


def prompts_for(model: str, base: str, n: int, length: int, seed: int = 0) -> list[list[int]]:
    """Random token ids for the random model; chat-templated questions (padded with more questions to about
    `length` tokens) for SmolLM2, so the real model sees real text."""
    rng = random.Random(seed)
    if model == "llama-160m":
        return [[rng.randrange(3, 32000) for _ in range(length)] for _ in range(n)]
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(base)
    out = []
    for _ in range(n):
        text = " ".join(rng.sample(QUESTIONS, len(QUESTIONS)))
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                      tokenize=True, return_dict=False)
        ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
        out.append(ids[:length - 5] + ids[-5:] if len(ids) > length else ids)
    return out


def case_names(case: str, n: int, base_name: str) -> list[str]:
    if case == "base":
        return [base_name] * n
    if case.startswith("lora"):
        d = int(case[4:])
        return [f"lora{i % d:03d}" for i in range(n)]
    if case == "mixed":
        kinds = [base_name, "lora000", "dora", "prefix", "prompt"]
        return [kinds[i % len(kinds)] for i in range(n)]
    raise ValueError(case)


# ---- the server ----------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(base: str, name: str, dirs: dict[str, str], args, extra: list[str]) -> tuple[subprocess.Popen, int]:
    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", "serve", "--model", base, "--served-model-name", name,
           "--dtype", args.dtype, "--port", str(port), "--max-num-seqs", str(args.max_num_seqs),
           "--kv-cache-memory", args.kv_cache_memory, "--max-loras", str(len(dirs)), "--log-level", "warning",
           "--max-waiting", "100000", *extra]
    for adapter, path in dirs.items():
        cmd += ["--adapter", f"{adapter}={path}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    child = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    return wait_healthy(child, port, 600, "server"), port


def wait_healthy(child: subprocess.Popen, port: int, timeout: float, what: str) -> subprocess.Popen:
    """Poll GET /health until it answers 200; kill the child and raise if it exits or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise RuntimeError(f"{what} exited with {child.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                if b" 200 " in s.recv(200):
                    return child
        except OSError:
            pass
        time.sleep(0.5)
    child.kill()
    raise RuntimeError(f"{what} did not start")


def stop_server(child: subprocess.Popen) -> None:
    child.terminate()
    try:
        child.wait(30)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


# ---- the client: bench/http_client.py ------------------------------------------------------------------------


def summarise(results: list[dict]) -> dict:
    start = min(r["start"] for r in results)
    end = max(r["end"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    ttft = sorted(r["ttft"] for r in results if r["ttft"] is not None)
    tpot = sorted(r["tpot"] for r in results if r["tpot"] is not None)

    def pct(xs, p):
        return xs[min(len(xs) - 1, int(p * len(xs)))] * 1e3 if xs else float("nan")
    return dict(tok_s=tokens / (end - start), req_s=len(results) / (end - start), ttft_p50_ms=pct(ttft, 0.5),
                ttft_p99_ms=pct(ttft, 0.99), tpot_p50_ms=pct(tpot, 0.5), tpot_p99_ms=pct(tpot, 0.99))


def step_counts(port: int) -> dict:
    """The engine's step counters from /metrics (peftserve_engine_*_total)."""
    import urllib.request
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    keys = {"peftserve_engine_steps_total": "num_steps", "peftserve_engine_step_seconds_total": "step_seconds",
            "peftserve_engine_step_tokens_total": "step_tokens", "peftserve_engine_step_sequences_total": "step_seqs"}
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in keys:
            out[keys[name]] = float(value)
    return out


def step_summary(before: dict, after: dict, seconds: float) -> dict:
    """Engine busy fraction and the mean step between two snapshots of the step counters."""
    d = {k: after[k] - before[k] for k in before}
    steps = max(d["num_steps"], 1)
    return dict(engine_busy=d["step_seconds"] / seconds, step_ms=d["step_seconds"] / steps * 1e3,
                tokens_per_step=d["step_tokens"] / steps, seqs_per_step=d["step_seqs"] / steps)


# ---- offline -------------------------------------------------------------------------------------------------------
def offline_engine(base: str, name: str, dirs: dict[str, str], args, prefix_caching: bool | None = None):
    from server.config import EngineConfig
    from server.engine import LLMEngine
    kwargs = dict(model=base, served_model_name=name, dtype=args.dtype, max_num_seqs=args.concurrency,
                  kv_cache_memory=args.kv_cache_memory, max_loras=len(dirs))
    if prefix_caching is not None:
        kwargs["enable_prefix_caching"] = prefix_caching
    engine = LLMEngine(EngineConfig(**kwargs))
    for adapter, path in dirs.items():
        engine.adapters.load(adapter, path)
    return engine


def run_offline(engine, prompts, names, base_name, output_len) -> tuple[float, dict]:
    from bench.common import Timer
    from server.sampling import SamplingParams
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    for i, (prompt, name) in enumerate(zip(prompts, names)):
        engine.add_request(f"off{i}-{random.getrandbits(32)}", prompt, params, None if name == base_name else name)
    n_out = 0
    before = dict(engine.step_counts)
    with Timer() as t:
        while engine.has_unfinished():
            n_out += sum(len(o.token_ids) for o in engine.step())
    return n_out / t.seconds, step_summary(before, engine.step_counts, t.seconds)


# ---- main ----------------------------------------------------------------------------------------------------------
def one_at_a_time(port: int, bodies: list[dict], weight_bytes: int) -> tuple[list[dict], list[float]]:
    """Each request alone, then the read floor (weight bytes / read bandwidth, seconds) measured right after it
    with the server idle. Returns the requests' results and their floors."""
    from bench.step_floor import read_bandwidth
    results, floors = [], []
    for body in bodies:
        results += asyncio.run(closed_loop(port, [body], 1))
        time.sleep(0.05)                        # the server's OpenMP threads stop spinning
        floors.append(weight_bytes / read_bandwidth(repeats=3))
    return results, floors


def bench_model(model: str, args) -> list[dict]:
    base = model_dir(model)
    name = model
    dirs = make_adapters(base, model, 64)
    prompt_len = args.prompt_len or (32 if model == "llama-160m" else 80)
    output_len = args.output_len or (32 if model == "llama-160m" else 64)
    prompts = prompts_for(model, base, args.requests, prompt_len)
    warm = prompts_for(model, base, 8, prompt_len, seed=1)
    rows = []
    engine = offline_engine(base, name, dirs, args)
    from bench.step_floor import linear_weights
    weight_bytes = sum(w.numel() * w.element_size() for w in linear_weights(engine.runner.model))
    offline, offline_steps = {}, {}
    for case in args.cases:                      # offline first (server not started: nothing else running)
        names = case_names(case, args.requests, name)
        run_offline(engine, warm, case_names(case, 8, name), name, 4)
        offline[case], offline_steps[case] = run_offline(engine, prompts, names, name, output_len)
    if not args.turns:
        del engine
    child, port = start_server(base, name, dirs, args, [])
    try:
        for case in args.cases:
            names = case_names(case, args.requests, name)
            bodies = [request_body(n, p, output_len) for n, p in zip(names, prompts)]
            asyncio.run(closed_loop(port, [request_body(n, p, 4) for n, p in
                                           zip(case_names(case, 8, name), warm)], 8))          # warm up
            before, start = step_counts(port), time.perf_counter()
            if args.concurrency == 1:
                results, floors = one_at_a_time(port, bodies, weight_bytes)
                closed = summarise(results)
                closed["tpot_over_floor"] = statistics.median(r["tpot"] / f for r, f in zip(results, floors))
                closed["floor_ms"] = statistics.median(floors) * 1e3
            else:
                closed = summarise(asyncio.run(closed_loop(port, bodies, args.concurrency)))
            steps = step_summary(before, step_counts(port), time.perf_counter() - start)
            row = dict(model=model, case=case, mode=f"closed {args.concurrency}", offline_tok_s=offline[case],
                       http_over_offline=closed["tok_s"] / offline[case], **closed, steps=steps,
                       offline_steps=offline_steps[case], weight_bytes=weight_bytes)
            emit(row)
            rows.append(row)
            for frac in args.rates:
                rate = closed["req_s"] * frac
                opened = summarise(asyncio.run(open_loop(port, bodies, rate)))
                row = dict(model=model, case=case, mode=f"open {rate:.2f} req/s ({frac:.0%})", **opened)
                emit(row)
                rows.append(row)
        if args.turns:
            from bench import http_turns
            rows.append(http_turns.in_turns(port, engine, model, prompts, output_len, args))
    finally:
        stop_server(child)
    return rows


def bench_shared_prefix(model: str, args) -> list[dict]:
    """~1k-token system prompt shared by every request, 8 LoRA adapters; prefix caching on and off."""
    base = model_dir(model)
    dirs = {k: v for k, v in make_adapters(base, model, 64).items() if k < "lora008"}
    rng = random.Random(7)
    system = [rng.randrange(3, 32000 if model == "llama-160m" else 49000) for _ in range(1024)]
    prompts = [system + [rng.randrange(3, 32000) for _ in range(32)] for _ in range(args.requests)]
    output_len = args.output_len or 32
    names = case_names("lora8", args.requests, model)
    bodies = [request_body(n, p, output_len) for n, p in zip(names, prompts)]
    rows = []
    for on in (True, False):
        child, port = start_server(base, model, dirs, args,
                                   ["--enable-prefix-caching" if on else "--no-enable-prefix-caching"])
        try:
            closed = summarise(asyncio.run(closed_loop(port, bodies, args.concurrency)))
        finally:
            stop_server(child)
        row = dict(model=model, case="shared 1k system prompt, 8 LoRA", mode=f"closed {args.concurrency}",
                   prefix_caching=on, **closed)
        emit(row)
        rows.append(row)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["llama-160m", "smollm2-135m"])
    ap.add_argument("--cases", nargs="+", default=["base", "lora8", "lora64", "mixed"])
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rates", nargs="*", type=float, default=[0.5, 0.9],
                    help="open-loop arrival rates as fractions of the closed-loop request rate")
    ap.add_argument("--prompt-len", type=int, default=0, help="default: 32 (llama-160m), 80 (smollm2-135m)")
    ap.add_argument("--output-len", type=int, default=0, help="default: 32 (llama-160m), 64 (smollm2-135m)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--kv-cache-memory", default="1GiB")
    ap.add_argument("--shared-prefix", action="store_true", help="only the shared-system-prompt workload")
    ap.add_argument("--turns", type=int, default=0,
                    help="then this many rounds of every case's closed loop over HTTP and offline in turns")
    args = ap.parse_args()
    load = os.getloadavg()[0]
    rows = []
    for model in args.models:
        rows += bench_shared_prefix(model, args) if args.shared_prefix else bench_model(model, args)
    from bench.step_floor import read_bandwidth
    bandwidth = read_bandwidth()                # measured here, in the same run, with no server running
    bandwidth_4k = read_bandwidth(huge_pages=False)
    print(f"\nmachine: {machine()}; load average at start {load:.2f}, at end {os.getloadavg()[0]:.2f}; "
          f"{args.requests} requests per case, {args.dtype}, greedy; read bandwidth {bandwidth / 1e9:.1f} GB/s\n")
    print("| model | case | mode | tok/s | offline tok/s | HTTP / offline | TTFT p50 / p99 ms | TPOT p50 / p99 ms "
          "| engine busy, HTTP / offline | mean step, HTTP / offline |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    turns = [r for r in rows if "rounds in turns" in r["mode"]]
    rows = [r for r in rows if r not in turns]
    for r in rows:
        off = f"{r['offline_tok_s']:.0f} | {r['http_over_offline']:.2f}" if "offline_tok_s" in r else " | "
        steps = " | "
        if "steps" in r:
            h, o = r["steps"], r["offline_steps"]
            steps = (f"{h['engine_busy']:.0%} / {o['engine_busy']:.0%} | {h['seqs_per_step']:.1f} / "
                     f"{o['seqs_per_step']:.1f} seqs, {h['step_ms']:.0f} / {o['step_ms']:.0f} ms")
        case = r["case"] + (f" (prefix caching {'on' if r['prefix_caching'] else 'off'})" if "prefix_caching" in r
                            else "")
        print(f"| {r['model']} | {case} | {r['mode']} | {r['tok_s']:.0f} | {off} | {r['ttft_p50_ms']:.0f} / "
              f"{r['ttft_p99_ms']:.0f} | {r['tpot_p50_ms']:.1f} / {r['tpot_p99_ms']:.1f} | {steps} |")
    for r in rows:
        if r["mode"] == "closed 1" and "weight_bytes" in r:    # one request at a time: a token is a weight read
            floor = r["weight_bytes"] / bandwidth * 1e3
            print(f"{r['model']} {r['case']} {args.dtype}, one request: TPOT p50 {r['tpot_p50_ms']:.1f} ms; "
                  f"median over requests of TPOT / the floor measured after it: {r['tpot_over_floor']:.2f}x "
                  f"(median floor {r['floor_ms']:.1f} ms); against the end-of-run floor "
                  f"({r['weight_bytes'] / 1e6:.0f} MB of linear weights / {bandwidth / 1e9:.1f} GB/s = {floor:.1f} ms): "
                  f"{r['tpot_p50_ms'] / floor:.2f}x (on 4 KiB pages, {bandwidth_4k / 1e9:.1f} GB/s: "
                  f"{r['tpot_p50_ms'] / (r['weight_bytes'] / bandwidth_4k * 1e3):.2f}x)")
    ratios = {}
    for r in rows:
        if r["mode"].startswith("closed") and "prefix_caching" not in r:
            ratios.setdefault(r["model"], {})[r["case"]] = r["tok_s"]
    for model, by_case in ratios.items():
        if "base" in by_case:
            print(f"\n{model}: " + ", ".join(f"{c} / base = {v / by_case['base']:.2f}" for c, v in by_case.items()
                                            if c != "base"))
    from bench import http_turns
    for row in turns:
        http_turns.print_turns(row)


if __name__ == "__main__":
    main()
