"""Hostile input from issue #11: every one gets a 4xx in OpenAI's shape (never a 500), and nothing else suffers:
tiny temperatures (B), huge prompts (C: tokenized off the event loop, refused untokenized when they cannot fit;
bodies over the limit are 413), seeds out of range and lone surrogates (D), empty adapter ids, and honest
messages for adapters that do not fit."""
from __future__ import annotations

import copy
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from server.prompt_tokenizer import CHARS_SLACK, PromptTokenizer
from tests.http.adapter_zoo import save_zoo
from tests.http.conftest import MODEL_NAME, assert_serving, make_engine, serve
from tests.http.test_errors import assert_error, completion


def raw_post(http: httpx.Client, path: str, raw: str) -> httpx.Response:
    """POST a body given as JSON text, so it can hold escapes like \\ud800 that json.dumps would not write."""
    return http.post(path, content=raw.encode(), headers={"content-type": "application/json"})


def greedy_text(http, **fields) -> str:
    body = completion(max_tokens=8, ignore_eos=True, **fields)
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


# ---- B: tiny temperatures ---------------------------------------------------------------------------------------
def test_tiny_temperature_is_greedy_and_harms_no_neighbour(client, server):
    reference = greedy_text(client, temperature=0)
    long_body = completion(max_tokens=120, ignore_eos=True, temperature=0, stream=True, prompt="import os")
    with ThreadPoolExecutor(1) as pool:
        def stream():
            with server.client() as http, http.stream("POST", "/v1/completions", json=long_body) as response:
                return response.status_code, [line for line in response.iter_lines() if line.startswith("data: ")]
        neighbour = pool.submit(stream)
        for temperature in (1e-300, 1e-45, 1e-39):
            assert greedy_text(client, temperature=temperature) == reference
        status, events = neighbour.result(60)
    assert status == 200 and events[-1] == "data: [DONE]"
    assert not any('"error"' in event for event in events)
    assert json.loads(events[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"


# ---- D: values out of range, text that is not text --------------------------------------------------------------
@pytest.mark.parametrize("seed", [2**64, 2**70, -(2**63) - 1])
def test_seed_out_of_range_is_400(client, seed):
    assert_error(client.post("/v1/completions", json=completion(seed=seed)), 400, "seed")
    assert_serving(client)


@pytest.mark.parametrize("seed", [2**64 - 1, -(2**63), 0])
def test_seed_at_the_limits_is_served(client, seed):
    first, second = (greedy_text(client, seed=seed, temperature=1.0) for _ in range(2))
    assert first == second


@pytest.mark.parametrize("path, raw, param", [
    ("/v1/completions", r'{"model": "demo", "prompt": "a\ud800b"}', "prompt"),
    ("/v1/completions", r'{"model": "demo", "prompt": ["\udfff"]}', "prompt.0"),
    ("/v1/completions", r'{"model": "demo", "prompt": "x", "stop": ["\ud800"]}', "stop.0"),
    ("/v1/completions", r'{"model": "\ud800", "prompt": "x"}', "model"),
    ("/v1/chat/completions", r'{"model": "demo", "messages": [{"role": "user", "content": "\ud800"}]}',
     "messages.0.content"),
    ("/v1/chat/completions", r'{"model": "demo", "messages": [{"role": "user", "content": [{"type": "text", '
                             r'"text": "\ud800"}]}]}', "messages.0.content.0.text"),
    ("/v1/chat/completions", r'{"model": "demo", "messages": [{"role": "user", "content": "x", "name": "\ud800"}]}',
     "messages.0"),
])
def test_lone_surrogate_is_400(client, path, raw, param):
    error = assert_error(raw_post(client, path, raw), 400, param)
    assert "unicode" in error["message"].lower()
    assert_serving(client)


def test_empty_adapter_id_is_400_naming_it(client):
    error = assert_error(client.post("/v1/completions", json=completion(adapter_id="")), 400, "adapter_id")
    assert MODEL_NAME not in error["message"]


# ---- C: big bodies ----------------------------------------------------------------------------------------------
class BlockingTokenizer:
    """A tokenizer whose encode of a text containing BLOCK waits for `release` (copies share the events)."""

    def __init__(self, inner, entered: threading.Event, release: threading.Event):
        self.inner, self.entered, self.release = inner, entered, release

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __deepcopy__(self, memo):
        return BlockingTokenizer(copy.deepcopy(self.inner, memo), self.entered, self.release)

    def encode(self, text, *args, **kwargs):
        if "BLOCK" in text:
            self.entered.set()
            assert self.release.wait(30)
        return self.inner.encode(text, *args, **kwargs)


def test_tokenizing_a_prompt_does_not_stall_the_server(demo_dir):
    engine = make_engine(demo_dir)
    entered, release = threading.Event(), threading.Event()
    engine.tokenizer = BlockingTokenizer(engine.tokenizer, entered, release)
    thread, served = serve(engine)
    try:
        with ThreadPoolExecutor(1) as pool, served.client(timeout=10) as http:
            slow = pool.submit(lambda: served.client().post("/v1/completions", json=completion(prompt="BLOCK x")))
            assert entered.wait(10)                   # its prompt is being tokenized, and stays so
            assert http.get("/health").status_code == 200
            assert_serving(http)                      # another text prompt is tokenized meanwhile
            chat = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
            assert http.post("/v1/chat/completions", json=chat).status_code == 200
            assert not slow.done()
            release.set()
            assert slow.result(30).status_code == 200
    finally:
        release.set()
        thread.stop()


def test_body_over_the_limit_is_413(demo_dir):
    thread, served = serve(make_engine(demo_dir), max_body_bytes=4096)
    try:
        with served.client() as http:
            big = completion(prompt="x" * 5000)
            error = assert_error(http.post("/v1/completions", json=big), 413, code="request_too_large")
            assert "4096" in error["message"]

            def chunks():                             # no Content-Length: counted as it arrives
                yield json.dumps(big)[:3000].encode()
                yield json.dumps(big)[3000:].encode()
            chunked = http.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
            assert_error(chunked, 413, code="request_too_large")
            admin = http.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "p" * 5000})
            assert_error(admin, 413, code="request_too_large")
            assert http.post("/v1/completions", json=completion(user="u" * 3500)).status_code == 200   # under
            assert http.get("/health").status_code == 200
            assert_serving(http)
    finally:
        thread.stop()


# ---- adapters that do not fit: the message says why -------------------------------------------------------------
def test_no_room_beside_prefix_adapters_says_so(demo_dir, tmp_path):
    dirs = save_zoo(demo_dir, tmp_path, names={"prefix", "lora-qv"})
    engine = make_engine(demo_dir, max_loras=1)
    engine.adapters.load("prefix", str(dirs["prefix"]))              # takes the only slot, never evicted
    thread, served = serve(engine, adapter_dirs=[str(tmp_path)])
    try:
        with served.client() as http:
            load = http.post("/v1/load_lora_adapter", json={"lora_name": "lora-qv", "lora_path": "lora-qv"})
            error = assert_error(load, 400, code="invalid_adapter")
            assert "beside the prefix / prompt-tuning adapters" in error["message"], error
            assert "pinned" not in error["message"] and "None" not in error["message"]
            assert_serving(http)
    finally:
        thread.stop()


def test_prompt_that_cannot_fit_is_refused_without_tokenizing(demo_dir):
    """#11 C: megabytes of text were tokenized (seconds, and memory glibc kept) only to be refused as too long.
    More characters than any max_model_len-token text can have is a 400 before tokenization."""
    engine = make_engine(demo_dir)
    entered, release = threading.Event(), threading.Event()
    engine.tokenizer = BlockingTokenizer(engine.tokenizer, entered, release)
    thread, served = serve(engine)
    limit = CHARS_SLACK * PromptTokenizer(engine.tokenizer).max_token_chars * engine.max_model_len
    try:
        with served.client() as http:
            too_long = "BLOCK" + "x" * limit
            error = assert_error(http.post("/v1/completions", json=completion(prompt=too_long)), 400, "prompt")
            assert "maximum context length" in error["message"]
            chat = {"model": MODEL_NAME, "messages": [{"role": "user", "content": too_long}]}
            assert_error(http.post("/v1/chat/completions", json=chat), 400, "messages")
            assert not entered.is_set()                                 # never handed to the tokenizer
            assert_serving(http)
    finally:
        release.set()
        thread.stop()
