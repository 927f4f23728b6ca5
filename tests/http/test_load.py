"""Load with churn: 32 clients, a few hundred requests over the base and adapters of every kind (LoRA, DoRA,
prefix, prompt tuning), streamed or not, of random lengths, while one adapter is replaced in place and another
unloaded / reloaded every half second and some clients hang up mid-stream. Zero 5xx; every greedy output equals
its solo run (requests for an adapter that was gone before admission get 404, counted apart); afterwards the
KV blocks, adapter refcounts, queues and streams are back to idle."""
from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.http.adapter_zoo import save_zoo
from tests.http.conftest import MODEL_NAME, make_engine, serve

STABLE = [MODEL_NAME, "lora-qv", "dora-ko", "prefix", "prompt"]
REPLACED, TOGGLED = "swap", "toggle"          # swap: lora-mlp <-> lora-embed in place; toggle: lora-qv weights
VERSIONS = {REPLACED: ["lora-mlp", "lora-embed"], TOGGLED: ["lora-qv"]}
PROMPTS = [[5, 17, 300, 42], [900, 3, 3, 81, 7, 64, 12], [250, 251], [11, 12, 13, 14, 15, 16, 17, 18],
           [77] * 20, [1000, 2, 500]]
LENGTHS = [3, 16]
NUM_CLIENTS, REQUESTS_PER_CLIENT = 32, 10
CHURN_PERIOD_S = 0.5


@pytest.fixture(scope="module")
def setup(demo_dir, tmp_path_factory):
    dirs = save_zoo(demo_dir, tmp_path_factory.mktemp("load"))
    engine = make_engine(demo_dir, max_loras=5)               # 2 slots held by prefix / prompt: evictions too
    for name in STABLE[1:]:
        engine.adapters.load(name, str(dirs[name]))
    for name in ("lora-mlp", "lora-embed"):                   # preloaded, so their directories are allowed
        engine.adapters.load(name, str(dirs[name]))
    thread, served = serve(engine)
    yield served, dirs
    thread.stop()


def body(model: str, prompt: list[int], max_tokens: int, stream: bool) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": stream}


def run(http, request: dict, hang_up: bool = False) -> tuple[int, str | None]:
    """(status, text); a stream's in-band error counts as a 500; `hang_up`: close after the first event."""
    if not request["stream"]:
        response = http.post("/v1/completions", json=request)
        return response.status_code, response.json()["choices"][0]["text"] if response.status_code == 200 else None
    with http.stream("POST", "/v1/completions", json=request) as response:
        if response.status_code != 200:
            response.read()
            return response.status_code, None
        chunks = []
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                break
            chunk = json.loads(line.removeprefix("data: "))
            if "error" in chunk:
                return 500, chunk["error"]["message"]
            chunks.append(chunk["choices"][0]["text"])
            if hang_up:
                return 499, None
    return 200, "".join(chunks)


def test_load_with_churn(setup):
    served, dirs = setup
    engine = served.engine
    with served.client() as http:
        solo = {(model, tuple(p), n): run(http, body(model, p, n, False))
                for model in [*STABLE, "lora-mlp", "lora-embed"] for p in PROMPTS for n in LENGTHS}
        assert all(status == 200 for status, _ in solo.values())
        for name in ("lora-mlp", "lora-embed"):
            assert http.post("/v1/unload_lora_adapter", json={"lora_name": name}).status_code == 200
        assert http.post("/v1/load_lora_adapter", json={"lora_name": REPLACED,
                                                        "lora_path": str(dirs["lora-mlp"])}).status_code == 200

    def allowed(model: str, prompt, n) -> set[str]:
        sources = VERSIONS.get(model, [model])
        return {solo[(source, tuple(prompt), n)][1] for source in sources}

    stop = threading.Event()
    churn_log: list[int] = []

    def churn():
        version, toggled = 0, False
        with served.client(timeout=120) as http:
            while not stop.wait(CHURN_PERIOD_S):
                version ^= 1
                swap = http.post("/v1/load_lora_adapter", json={
                    "lora_name": REPLACED, "lora_path": str(dirs[VERSIONS[REPLACED][version]]), "load_inplace": True})
                if toggled:
                    toggle = http.post("/v1/unload_lora_adapter", json={"lora_name": TOGGLED})
                else:
                    toggle = http.post("/v1/load_lora_adapter", json={
                        "lora_name": TOGGLED, "lora_path": str(dirs["lora-qv"])})
                toggled = not toggled
                churn_log.extend([swap.status_code, toggle.status_code])

    def client(seed: int) -> list[tuple]:
        rng = random.Random(seed)
        out = []
        with served.client(timeout=120) as http:
            for _ in range(REQUESTS_PER_CLIENT):
                model = rng.choice([*STABLE, REPLACED, TOGGLED])
                prompt, n, stream = rng.choice(PROMPTS), rng.choice(LENGTHS), rng.random() < 0.5
                hang_up = stream and rng.random() < 0.1
                status, text = run(http, body(model, prompt, n, stream), hang_up)
                out.append((model, prompt, n, hang_up, status, text))
        return out

    churner = threading.Thread(target=churn)
    churner.start()
    try:
        with ThreadPoolExecutor(NUM_CLIENTS) as pool:
            results = [r for rs in pool.map(client, range(NUM_CLIENTS)) for r in rs]
    finally:
        stop.set()
        churner.join(30)

    statuses = Counter(status for *_, status, _ in results)
    print(f"statuses {dict(statuses)}, churn operations {len(churn_log)}, preemptions {engine.num_preemptions}, "
          f"evictions {engine.adapters.num_evictions}")
    assert not [r for r in results if r[4] >= 500], statuses
    assert len(churn_log) >= 4 and set(churn_log) == {200}, churn_log
    not_found = [r for r in results if r[4] == 404]
    assert all(model == TOGGLED for model, *_ in not_found)          # only the toggled adapter is ever gone
    hung_up = [r for r in results if r[4] == 499]
    assert hung_up and all(r[3] for r in hung_up)
    served_ok = [r for r in results if r[4] == 200]
    assert len(served_ok) + len(not_found) + len(hung_up) == len(results), statuses
    assert len(served_ok) >= len(results) // 2
    for model, prompt, n, _, _, text in served_ok:
        assert text in allowed(model, prompt, n), (model, prompt, n, text)
    assert {r[0] for r in served_ok} == {*STABLE, REPLACED, TOGGLED}

    deadline = time.monotonic() + 10
    while engine.has_unfinished() or served.async_engine.stats()["num_running"]:
        assert time.monotonic() < deadline, "engine never went idle"
        time.sleep(0.01)
    stats = served.async_engine.stats()
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0
    assert engine.scheduler.blocks.num_used == sum(len(p.blocks) for p in engine.prefixes.prefixes.values())
    assert all(h.refcount == 0 for h in engine.adapters.handles.values()) and not engine.adapters.draining
    assert not served.async_engine._streams and not served.async_engine._in_engine
    with served.client() as http:
        assert http.get("/health").status_code == 200
