"""Soak: thousands of mixed requests against a real `uvicorn` server process while adapters churn; throughput over
time and the server's RSS at start / middle / end. Not run in CI.

    python -m bench.soak [--requests 3000] [--clients 16] [--interval 5] [--churn-period 1.0]
                         [--max-rss-growth-mib 64] [--max-late-growth-mib 32]

Server: a child process serving the demo-sized random Llama (hidden 256, 4 layers, bench cache) with PEFT-made
adapters preloaded: LoRA on q/v, LoRA on the MLP, DoRA on k/o, prefix tuning, prompt tuning; a device tier of
5 slots, so LoRA adapters are evicted and slots reused. Clients (threads, one HTTP connection each) send
requests for the base or any adapter (uniform), streamed half the time: completions of 4..64 random token ids
(half), completions of 2..40 words of text (a quarter), chats (a quarter); greedy, max_tokens 1..32; 5% of
streams hang up after the first event. A churn thread replaces one adapter in
place (`load_inplace`, alternating two checkpoints) and unloads / reloads another every --churn-period seconds.
Every --interval seconds one JSON line: requests done, requests/s and output tokens/s in the window, server RSS.

Pass/fail (exit status 1 otherwise): zero 5xx (in-band stream errors count), and RSS bounded: after a warm-up
of the first 10% of requests, the end RSS is within --max-rss-growth-mib of the warm RSS, and within
--max-late-growth-mib of the middle RSS (no steady leak in the second half).
Small check run: python -m bench.soak --requests 200 --clients 8 --interval 2
"""
from __future__ import annotations

import argparse
import json
import random
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil

from bench.common import CACHE, emit, machine

MODEL = "soak"
ADAPTERS = ["lora-qv", "lora-mlp", "dora-ko", "prefix", "prompt"]
REPLACED, TOGGLED = "swap", "toggle"


def adapter_configs() -> dict:
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig
    return {
        "lora-qv": LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        "lora-mlp": LoraConfig(r=8, lora_alpha=16, target_modules=["gate_proj", "up_proj", "down_proj"],
                               init_lora_weights=False),
        "dora-ko": LoraConfig(r=8, lora_alpha=16, target_modules=["k_proj", "o_proj"], use_dora=True,
                              init_lora_weights=False),
        "prefix": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=10),
        "prompt": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8),
    }


def prepare() -> tuple[str, dict[str, str]]:
    """The model and adapter directories (made once, in the bench cache)."""
    from server.demo import ensure_demo_model
    from tests.peft_fixtures import save_adapter
    model = ensure_demo_model(CACHE / "soak-demo")
    root = CACHE / "soak-adapters"
    dirs = {}
    for i, (name, config) in enumerate(adapter_configs().items()):
        path = root / name
        if not (path / "adapter_config.json").exists():
            save_adapter(Path(model), config, path, seed=100 + i)
        dirs[name] = str(path)
    return model, dirs


def serve(model: str, dirs: dict[str, str], port: int) -> None:
    """Child process: the server (adapters preloaded, every adapter directory allowed for loads)."""
    import uvicorn
    from server.api import build_app
    from server.async_engine import AsyncEngine
    from server.config import EngineConfig
    from server.engine import LLMEngine
    engine = LLMEngine(EngineConfig(model=model, served_model_name=MODEL, max_loras=5, kv_cache_memory="256MiB"))
    for name, path in dirs.items():
        engine.adapters.load(name, path)
    app = build_app(AsyncEngine(engine), adapter_dirs=sorted({str(Path(p).parent) for p in dirs.values()}))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


WORDS = "def class return import self value list dict for while if else try yield lambda none".split()


def one_request(http: httpx.Client, rng: random.Random, vocab: int) -> tuple[str, int]:
    """(outcome, output tokens): outcome is the status ("200", "404", ...), "hangup", or "stream-error".
    Half the requests are completions of token ids, a quarter completions of text, a quarter chats."""
    model = rng.choice([MODEL, *ADAPTERS, REPLACED, TOGGLED])
    body = {"model": model, "max_tokens": rng.randint(1, 32), "temperature": 0, "ignore_eos": True,
            "stream": rng.random() < 0.5}
    kind = rng.random()
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 40)))
    if kind < 0.5:
        body["prompt"] = [rng.randrange(3, vocab) for _ in range(rng.randint(4, 64))]
    elif kind < 0.75:
        body["prompt"] = text
    else:
        body["messages"] = [{"role": "user", "content": text}]
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    if body["stream"]:
        body["stream_options"] = {"include_usage": True}
    else:
        response = http.post(path, json=body)
        tokens = response.json()["usage"]["completion_tokens"] if response.status_code == 200 else 0
        return str(response.status_code), tokens
    hang_up = rng.random() < 0.05
    with http.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            response.read()
            return str(response.status_code), 0
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if "error" in chunk:
                return "stream-error", 0
            if hang_up:
                return "hangup", 0
            if chunk.get("usage"):
                return "200", chunk["usage"]["completion_tokens"]
    return "200", 0


def churn(url: str, dirs: dict[str, str], period: float, stop: threading.Event, log: Counter) -> None:
    version, toggled = 0, False
    with httpx.Client(base_url=url, timeout=60) as http:
        http.post("/v1/load_lora_adapter", json={"lora_name": REPLACED, "lora_path": dirs["lora-mlp"]})
        while not stop.wait(period):
            version ^= 1
            swap = http.post("/v1/load_lora_adapter", json={
                "lora_name": REPLACED, "lora_path": dirs["lora-qv" if version else "lora-mlp"], "load_inplace": True})
            if toggled:
                toggle = http.post("/v1/unload_lora_adapter", json={"lora_name": TOGGLED})
            else:
                toggle = http.post("/v1/load_lora_adapter", json={"lora_name": TOGGLED, "lora_path": dirs["dora-ko"]})
            toggled = not toggled
            log[f"churn {swap.status_code}"] += 1
            log[f"churn {toggle.status_code}"] += 1


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--interval", type=float, default=5.0)
    parser.add_argument("--churn-period", type=float, default=1.0)
    parser.add_argument("--max-rss-growth-mib", type=float, default=64)
    parser.add_argument("--max-late-growth-mib", type=float, default=32)
    parser.add_argument("--serve", nargs=2, metavar=("PORT", "DIRS_JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    model, dirs = prepare()
    if args.serve:
        serve(model, json.loads(args.serve[1]), int(args.serve[0]))
        return 0

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    child = subprocess.Popen([sys.executable, "-m", "bench.soak", "--serve", str(port), json.dumps(dirs)],
                             cwd=Path(__file__).resolve().parent.parent)
    try:
        vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
        return drive(args, url, dirs, vocab, psutil.Process(child.pid))
    finally:
        child.terminate()
        child.wait(30)


def drive(args, url: str, dirs: dict[str, str], vocab: int, server: psutil.Process) -> int:
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(url + "/health").status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.2)
    outcomes: Counter = Counter()
    done, tokens = [0], [0]
    lock = threading.Lock()
    next_index = iter(range(args.requests))
    rss: dict[str, int] = {}
    warm_at, middle_at = args.requests // 10, args.requests // 2

    def client(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=url, timeout=120) as http:
            while True:
                with lock:
                    i = next(next_index, None)
                if i is None:
                    return
                outcome, n = one_request(http, rng, vocab)
                with lock:
                    outcomes[outcome] += 1
                    done[0] += 1
                    tokens[0] += n
                    for name, at in (("warm", warm_at), ("middle", middle_at)):
                        if done[0] == at:
                            rss[name] = server.memory_info().rss

    rss["start"] = server.memory_info().rss
    stop = threading.Event()
    churner = threading.Thread(target=churn, args=(url, dirs, args.churn_period, stop, outcomes))
    churner.start()
    start = last_t = time.monotonic()
    last_done = last_tokens = 0
    with ThreadPoolExecutor(args.clients) as pool:
        futures = [pool.submit(client, seed) for seed in range(args.clients)]
        while not all(f.done() for f in futures):
            time.sleep(args.interval)
            now = time.monotonic()
            with lock:
                d, t = done[0], tokens[0]
            emit({"t_s": round(now - start, 1), "requests_done": d,
                  "requests_per_s": round((d - last_done) / (now - last_t), 2),
                  "output_tokens_per_s": round((t - last_tokens) / (now - last_t), 1),
                  "server_rss_mib": round(server.memory_info().rss / 2**20, 1)})
            last_t, last_done, last_tokens = now, d, t
        for f in futures:
            f.result()
    stop.set()
    churner.join(60)
    elapsed = time.monotonic() - start
    time.sleep(1)                                   # let the engine finish aborted streams
    rss["end"] = server.memory_info().rss
    stats = httpx.get(url + "/v1/adapters").json()["usage"]
    mib = {k: round(v / 2**20, 1) for k, v in rss.items()}
    num_5xx = sum(n for outcome, n in outcomes.items() if outcome.startswith("5") or outcome == "stream-error"
                  or outcome.startswith("churn 5"))
    growth, late = mib["end"] - mib["warm"], mib["end"] - mib["middle"]
    ok = num_5xx == 0 and growth <= args.max_rss_growth_mib and late <= args.max_late_growth_mib
    emit({"summary": True, "requests": args.requests, "clients": args.clients, "seconds": round(elapsed, 1),
          "requests_per_s": round(args.requests / elapsed, 2), "output_tokens_per_s": round(tokens[0] / elapsed, 1),
          "outcomes": dict(sorted(outcomes.items())), "num_5xx": num_5xx, "rss_mib": mib,
          "rss_growth_mib": round(growth, 1), "late_growth_mib": round(late, 1), "adapter_usage": stats,
          "bounds_mib": [args.max_rss_growth_mib, args.max_late_growth_mib], "ok": ok, "machine": machine()})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
