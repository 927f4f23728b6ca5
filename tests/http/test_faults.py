"""Faults in one request's share of a step fail that request alone (a 500 naming the error); the step's other
requests finish with exactly their solo text, nothing leaks (KV blocks, adapter refcounts, queues), and /health
stays 200. Faults: an exception in one request's sampling, detokenization or adapter kernel; an adapter install
failing halfway; a loader thread raising; a truncated checkpoint; a KV cache too small for the prompts."""
from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from adapters.lora_runtime import LinearLora, LoraRuntime
from server import step_sampling
from server.config import EngineConfig
from server.detokenizer import Detokenizer
from server.engine import LLMEngine
from tests.http.adapter_zoo import save_zoo
from tests.http.conftest import MODEL_NAME, GatedEngine, assert_serving, make_engine, serve

ADAPTERS = ["lora-qv", "dora-ko", "lora-mlp", "prefix", "prompt"]
PROMPTS = [[5, 17, 300, 42], [900, 3, 3, 81, 7, 64, 12], [250, 251], [11, 12, 13, 14, 15, 16, 17, 18]]
MAX_TOKENS = 12
POISON_SEED = 4242


@pytest.fixture(scope="module")
def root(demo_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults")
    dirs = save_zoo(demo_dir, root)
    shutil.copytree(dirs["lora-qv"], root / "bad")           # the same weights under another name
    return root


@pytest.fixture(scope="module")
def served(demo_dir, root):
    engine = make_engine(demo_dir, max_loras=8)
    for name in [*ADAPTERS, "bad"]:
        engine.adapters.load(name, str(root / name))
    thread, served = serve(GatedEngine(engine), adapter_dirs=[str(root)])
    yield served
    served.engine.gate.set()
    thread.stop()


def body(model, prompt, stream=False, **fields) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
            "stream": stream, **fields}


def post(served, request: dict) -> tuple[int, str, dict | None]:
    """(status, text, error): a stream's text is its chunks' concatenation, its error the in-band one."""
    with served.client() as http:
        if not request["stream"]:
            response = http.post("/v1/completions", json=request)
            payload = response.json()
            if response.status_code != 200:
                return response.status_code, "", payload["error"]
            return 200, payload["choices"][0]["text"], None
        with http.stream("POST", "/v1/completions", json=request) as response:
            if response.status_code != 200:
                response.read()
                return response.status_code, "", response.json()["error"]
            events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    errors = [chunk["error"] for chunk in chunks if "error" in chunk]
    if errors:
        return 500, "", errors[0]
    return 200, "".join(c["choices"][0]["text"] for c in chunks if c["choices"]), None


@pytest.fixture(scope="module")
def solo(served) -> dict:
    """Each (model, prompt) run alone on the idle server."""
    out = {}
    for model in [MODEL_NAME, *ADAPTERS]:
        for i, prompt in enumerate(PROMPTS):
            status, text, error = post(served, body(model, prompt))
            assert status == 200, error
            out[model, i] = text
    return out


def bystanders() -> list[dict]:
    """Requests of every adapter kind and the base, half of them streamed."""
    return [body(model, PROMPTS[i % len(PROMPTS)], stream=i % 2 == 1) | {"_key": (model, i % len(PROMPTS))}
            for i, model in enumerate([MODEL_NAME, *ADAPTERS, MODEL_NAME, "lora-qv"])]


def run_together(served, culprit: dict, others: list[dict]) -> tuple[tuple, list[tuple]]:
    """Hold the engine, queue every request (the culprit last), release: they share steps."""
    engine = served.engine
    engine.gate.clear()
    try:
        with ThreadPoolExecutor(len(others) + 1) as pool:
            futures = []
            for request in [*others, culprit]:
                before = served.async_engine.stats()["num_waiting"]
                futures.append(pool.submit(post, served, {k: v for k, v in request.items() if k != "_key"}))
                deadline = time.monotonic() + 10
                while served.async_engine.stats()["num_waiting"] == before and len(futures) > 1:
                    assert time.monotonic() < deadline, "request never queued"
                    time.sleep(0.005)
            engine.gate.set()
            results = [f.result(60) for f in futures]
    finally:
        engine.gate.set()
    return results[-1], results[:-1]


def assert_idle(served) -> None:
    engine = served.engine._engine
    deadline = time.monotonic() + 10
    while engine.has_unfinished() or served.async_engine.stats()["num_running"]:
        assert time.monotonic() < deadline, "engine never went idle"
        time.sleep(0.01)
    prefix_blocks = sum(len(p.blocks) for p in engine.prefixes.prefixes.values())
    assert engine.scheduler.blocks.num_used == prefix_blocks
    assert engine.scheduler.num_unfinished == 0 and not engine.requests
    assert all(h.refcount == 0 for h in engine.adapters.handles.values()) and not engine.adapters.draining
    with served.client() as http:
        assert http.get("/health").status_code == 200
        assert_serving(http)


def check(served, solo, culprit: dict, match: str) -> None:
    (status, _, error), results = run_together(served, culprit, bystanders())
    assert status == 500 and error["code"] == "internal_error" and match in error["message"], error
    for request, (status, text, error) in zip(bystanders(), results):
        assert status == 200, (request, error)
        assert text == solo[request["_key"]], request
    assert_idle(served)


@pytest.mark.parametrize("stream", [False, True])
def test_exception_in_one_requests_sampling(served, solo, monkeypatch, stream):
    real_sample = step_sampling.sample

    def poisoned(logits, params, generators, *rest):
        if any(p.seed == POISON_SEED for p in params):
            raise RuntimeError("injected sampling fault")
        return real_sample(logits, params, generators, *rest)

    monkeypatch.setattr(step_sampling, "sample", poisoned)
    culprit = body("lora-qv", PROMPTS[0], stream, temperature=0.8, seed=POISON_SEED)
    check(served, solo, culprit, "injected sampling fault")


@pytest.mark.parametrize("stream", [False, True])
def test_exception_in_one_requests_detokenization(served, solo, monkeypatch, stream):
    real_add = Detokenizer.add

    def poisoned(self, token_id):
        if "POISON" in self.stop and len(self.ids) > 8:          # after a few tokens
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected detokenizer fault")
        return real_add(self, token_id)

    monkeypatch.setattr(Detokenizer, "add", poisoned)
    check(served, solo, body(MODEL_NAME, PROMPTS[1], stream, stop=["POISON"]), "injected detokenizer fault")


def test_exception_in_one_adapters_kernel(served, solo, monkeypatch):
    engine = served.engine._engine
    real_call = LinearLora.__call__

    def poisoned(self, x, y, meta, linear):
        view = meta.adapters.get("lora")
        seg = view.segments[linear.layer] if view is not None else None
        if seg is not None and engine.adapters.get("bad").slot in seg.slot_list:
            raise RuntimeError("injected kernel fault")
        return real_call(self, x, y, meta, linear)

    monkeypatch.setattr(LinearLora, "__call__", poisoned)
    check(served, solo, body("bad", PROMPTS[2]), "injected kernel fault")
    status, _, error = post(served, body("bad", PROMPTS[2]))           # alone in its steps
    assert status == 500 and "injected kernel fault" in error["message"]
    assert_idle(served)


def test_install_failing_halfway_leaves_no_trace(served, solo, monkeypatch):
    """An install that writes some stacks and then raises: the load fails, the slot is cleared, the others'
    outputs are unchanged, and the same adapter loads fine afterwards."""
    real_install = LoraRuntime.install

    def half(self, slot, adapter):
        real_install(self, slot, adapter)
        raise RuntimeError("injected install fault")

    with served.client() as http:
        monkeypatch.setattr(LoraRuntime, "install", half)
        with ThreadPoolExecutor(4) as pool:
            others = [pool.submit(post, served, body(m, PROMPTS[3])) for m in (MODEL_NAME, "lora-qv", "prefix")]
            load = http.post("/v1/load_lora_adapter", json={"lora_name": "half", "lora_path": "lora-mlp"})
            results = [f.result(60) for f in others]
        assert load.status_code == 500 and load.json()["error"]["code"] == "internal_error"
        assert [r[:2] for r in results] == [(200, solo[m, 3]) for m in (MODEL_NAME, "lora-qv", "prefix")]
        assert "half" not in served.engine.adapters
        monkeypatch.setattr(LoraRuntime, "install", real_install)
        for model in (MODEL_NAME, *ADAPTERS):
            assert post(served, body(model, PROMPTS[0]))[:2] == (200, solo[model, 0]), model
        load = http.post("/v1/load_lora_adapter", json={"lora_name": "half", "lora_path": "lora-mlp"})
        assert load.status_code == 200, load.text
        assert post(served, body("half", PROMPTS[0]))[:2] == (200, solo["lora-mlp", 0])
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "half"}).status_code == 200
    assert_idle(served)


def test_loader_thread_raising_and_truncated_checkpoint(served, solo, root, monkeypatch, tmp_path):
    engine = served.engine._engine
    real_loader = engine.adapters.loaders["lora"]

    def raising(path):
        raise OSError("injected read failure")

    broken = root / "truncated"
    shutil.copytree(root / "lora-mlp", broken, dirs_exist_ok=True)
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with served.client() as http, ThreadPoolExecutor(4) as pool:
        others = [pool.submit(post, served, body(m, PROMPTS[1], stream=True)) for m in (MODEL_NAME, "dora-ko")]
        truncated = http.post("/v1/load_lora_adapter", json={"lora_name": "t", "lora_path": "truncated"})
        assert truncated.status_code == 400 and truncated.json()["error"]["code"] == "invalid_adapter"
        assert http.post("/v1/completions", json=body("truncated", PROMPTS[0])).status_code == 400   # JIT
        monkeypatch.setitem(engine.adapters.loaders, "lora", raising)
        failed = http.post("/v1/load_lora_adapter", json={"lora_name": "r", "lora_path": "lora-mlp"})
        assert failed.status_code == 500 and failed.json()["error"]["code"] == "internal_error"
        assert [f.result(60)[:2] for f in others] == [(200, solo[m, 1]) for m in (MODEL_NAME, "dora-ko")]
        monkeypatch.setitem(engine.adapters.loaders, "lora", real_loader)
        assert {"t", "r", "truncated"}.isdisjoint(engine.adapters.names())
    shutil.rmtree(broken)
    assert_idle(served)


def test_install_failing_at_admission_fails_only_its_requests(demo_dir, root, monkeypatch):
    """Two device slots, "bad" on the host tier: admitting its request installs it (evicting an idle adapter),
    and that install raises. Its requests fail; the step goes on for everyone else."""
    engine = make_engine(demo_dir, max_loras=2)
    for name in ("lora-qv", "dora-ko", "bad"):
        engine.adapters.load(name, str(root / name))
    assert engine.adapters.get("bad").slot is None
    thread, small = serve(GatedEngine(engine))
    try:
        others = [body(m, PROMPTS[i % len(PROMPTS)], stream=i % 2 == 0) for i, m in
                  enumerate([MODEL_NAME, "lora-qv", "dora-ko", MODEL_NAME, "dora-ko"])]
        expected = [post(small, r)[:2] for r in others]
        real_install = LoraRuntime.install

        def failing(self, slot, adapter):
            if adapter.path.endswith("bad"):
                raise RuntimeError("injected install fault")
            return real_install(self, slot, adapter)

        monkeypatch.setattr(LoraRuntime, "install", failing)
        (status, _, error), results = run_together(small, body("bad", PROMPTS[0]), others)
        assert status == 500 and "injected install fault" in error["message"], error
        assert [r[:2] for r in results] == expected
        monkeypatch.setattr(LoraRuntime, "install", real_install)
        same_weights = post(small, body("lora-qv", PROMPTS[0]))
        assert same_weights[0] == 200 and post(small, body("bad", PROMPTS[0]))[:2] == same_weights[:2]
        assert all(h.refcount == 0 for h in engine.adapters.handles.values())
        assert engine.scheduler.blocks.num_used == 0 and not engine.has_unfinished()
    finally:
        thread.stop()


def test_kv_cache_exhausted_by_long_prompts(demo_dir, root):
    """32 KV blocks (512 tokens) for five requests of ~260 tokens each, queued together: running requests are
    preempted and recomputed, none fails, every output is its solo one."""
    engine = LLMEngine(EngineConfig(model=demo_dir, served_model_name=MODEL_NAME, kv_cache_memory="256KiB"))
    for name in ("lora-qv", "prefix"):
        engine.adapters.load(name, str(root / name))
    thread, small = serve(GatedEngine(engine))
    try:
        long_prompts = [[(7 * i + j) % 1000 + 3 for j in range(180 + 10 * i)] for i in range(5)]
        models = [MODEL_NAME, "lora-qv", "prefix", MODEL_NAME, "lora-qv"]
        requests = [body(m, p, stream=i % 2 == 0, max_tokens=64) for i, (m, p) in enumerate(zip(models, long_prompts))]
        expected = [post(small, r) for r in requests]              # one at a time
        assert all(status == 200 for status, _, _ in expected)
        culprit, results = run_together(small, requests[-1], requests[:-1])
        assert [r[:2] for r in [*results, culprit]] == [e[:2] for e in expected]
        assert engine.num_preemptions > 0
        with small.client() as http:
            assert http.get("/health").status_code == 200
        assert engine.scheduler.blocks.num_used == sum(len(p.blocks) for p in engine.prefixes.prefixes.values())
    finally:
        thread.stop()
