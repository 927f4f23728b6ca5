"""Prefix tuning, prompt tuning and P-tuning through HTTP: concurrent requests of every kind (with LoRA and the
base) equal PEFT's text; streaming; usage counts the request's own tokens; virtual tokens share the context."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from peft import LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig
from transformers import AutoTokenizer

from tests.http.conftest import MODEL_NAME, make_engine, serve_adapters
from tests.peft_fixtures import greedy_full_forward, load_peft, save_adapter
from tests.tiny_models import load_hf

MAX_TOKENS = 10
MAX_MODEL_LEN = 64
NUM_VIRTUAL = {"prefix": 5, "prompt": 6, "ptune": 4, "lora": 0}


def configs(demo_dir: str) -> dict:
    return {
        "prefix": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, prefix_projection=True,
                                     encoder_hidden_size=32),
        "prompt": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6, prompt_tuning_init="TEXT",
                                     prompt_tuning_init_text="import os", tokenizer_name_or_path=demo_dir),
        "ptune": PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=32),
        "lora": LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    }


@pytest.fixture(scope="module")
def adapter_dirs(demo_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("http-prompt-adapters")
    return {name: save_adapter(Path(demo_dir), cfg, root / name, seed=10 + i) for i, (name, cfg) in
            enumerate(configs(demo_dir).items())}


@pytest.fixture(scope="module")
def prompt_server(demo_dir, adapter_dirs):
    thread, served = serve_adapters(make_engine(demo_dir, max_model_len=MAX_MODEL_LEN), adapter_dirs)
    yield served
    thread.stop()


def peft_text(demo_dir, adapter_dirs, name: str | None, prompt_ids: list[int]) -> str:
    model = load_hf(Path(demo_dir)) if name is None else load_peft(Path(demo_dir), {name: adapter_dirs[name]})
    tokens, _ = greedy_full_forward(model, prompt_ids, MAX_TOKENS)      # not `generate`: see its docstring
    return AutoTokenizer.from_pretrained(demo_dir).decode(tokens, skip_special_tokens=True)


def complete(served, **body) -> dict:
    body = {"max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, **body}
    with served.client() as http:
        response = http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_concurrent_requests_of_every_kind_equal_peft(prompt_server, demo_dir, adapter_dirs):
    tokenizer = AutoTokenizer.from_pretrained(demo_dir)
    prompts = {"prefix": "def add(a, b):", "prompt": "class Foo:", "ptune": "for i in range(",
               "lora": "import sys\n", None: "while True:"}

    def ask(name):
        return complete(prompt_server, model=name or MODEL_NAME, prompt=prompts[name])

    with ThreadPoolExecutor(len(prompts)) as pool:
        replies = dict(zip(prompts, pool.map(ask, list(prompts))))
    for name, prompt in prompts.items():
        prompt_ids = tokenizer.encode(prompt)
        assert replies[name]["choices"][0]["text"] == peft_text(demo_dir, adapter_dirs, name, prompt_ids), name
        # usage counts the request's own tokens; virtual tokens are not prompt tokens
        assert replies[name]["usage"]["prompt_tokens"] == len(prompt_ids)
        assert replies[name]["usage"]["completion_tokens"] == MAX_TOKENS
    assert len({r["choices"][0]["text"] for r in replies.values()}) == len(prompts)


@pytest.mark.parametrize("name", ["prefix", "prompt"])
def test_streaming_equals_whole_reply(prompt_server, name):
    body = {"model": name, "prompt": "x = [", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    whole = complete(prompt_server, **body)
    with prompt_server.client() as http:
        with http.stream("POST", "/v1/completions",
                         json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
            assert r.status_code == 200
            chunks = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert chunks[-1] == "[DONE]"
    events = [json.loads(c) for c in chunks[:-1]]
    assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) == whole["choices"][0]["text"]
    assert events[-1]["usage"] == whole["usage"]


def test_virtual_tokens_share_the_context(prompt_server):
    """max_model_len = virtual + prompt + output: chat's default max_tokens leaves room for them, a request that
    would not fit is a 400 naming them, and /v1/models gives each adapter's remaining context."""
    messages = [{"role": "user", "content": "Sort a list."}]
    with prompt_server.client() as http:
        chat = http.post("/v1/chat/completions", json={"model": "prompt", "messages": messages, "temperature": 0,
                                                        "ignore_eos": True})
        assert chat.status_code == 200, chat.text
        usage = chat.json()["usage"]
        assert usage["prompt_tokens"] + usage["completion_tokens"] == MAX_MODEL_LEN - NUM_VIRTUAL["prompt"]
        assert chat.json()["choices"][0]["finish_reason"] == "length"

        prompt = list(range(10, 10 + MAX_MODEL_LEN - MAX_TOKENS))       # fits the base model exactly
        body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
        assert http.post("/v1/completions", json={**body, "model": MODEL_NAME}).status_code == 200
        too_long = http.post("/v1/completions", json={**body, "model": "prefix"})
        assert too_long.status_code == 400
        assert "virtual tokens 5" in too_long.json()["error"]["message"]

        cards = {m["id"]: m["max_model_len"] for m in http.get("/v1/models").json()["data"]}
    assert cards == {MODEL_NAME: MAX_MODEL_LEN, **{n: MAX_MODEL_LEN - v for n, v in NUM_VIRTUAL.items()}}
