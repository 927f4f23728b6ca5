"""Adapters through HTTP: `model` picks the adapter, concurrent requests for 3 adapters and the base each equal
PEFT's output on the same weights; LoRAX's adapter_id, adapter_drop, /v1/models, unknown adapters."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from transformers import AutoTokenizer

from tests.http.conftest import MODEL_NAME, make_engine, serve_adapters
from tests.peft_fixtures import load_peft, save_adapter

ADAPTERS = {
    "qv": LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    "mlp": LoraConfig(r=4, lora_alpha=4, target_modules=["gate_proj", "up_proj", "down_proj"],
                      init_lora_weights=False),
    "dora": LoraConfig(r=8, lora_alpha=8, target_modules=["k_proj", "o_proj"], use_dora=True,
                       init_lora_weights=False),
}
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def adapter_dirs(demo_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("http-adapters")
    return {name: save_adapter(Path(demo_dir), cfg, root / name, seed=i) for i, (name, cfg) in
            enumerate(ADAPTERS.items())}


@pytest.fixture(scope="module")
def lora_server(demo_dir, adapter_dirs):
    thread, served = serve_adapters(make_engine(demo_dir), adapter_dirs)
    yield served
    thread.stop()


def peft_text(demo_dir, adapter_dirs, name: str | None, prompt_ids: list[int]) -> str:
    model = load_peft(Path(demo_dir), {name or "qv": adapter_dirs[name or "qv"]})
    args = dict(input_ids=torch.tensor([prompt_ids]), max_new_tokens=MAX_TOKENS, do_sample=False)
    if name is None:
        with model.disable_adapter():
            out = model.generate(**args)
    else:
        out = model.generate(**args)
    tokenizer = AutoTokenizer.from_pretrained(demo_dir)
    return tokenizer.decode(out[0, len(prompt_ids):], skip_special_tokens=True)


def test_concurrent_adapter_and_base_requests_equal_peft(lora_server, demo_dir, adapter_dirs):
    tokenizer = AutoTokenizer.from_pretrained(demo_dir)
    prompts = {"qv": "def add(a, b):", "mlp": "import os\n", "dora": "class Foo:", None: "for i in range("}
    models = {name: name or MODEL_NAME for name in prompts}

    def ask(name):
        with lora_server.client() as http:
            body = {"model": models[name], "prompt": prompts[name], "max_tokens": MAX_TOKENS, "temperature": 0,
                    "ignore_eos": True}
            response = http.post("/v1/completions", json=body)
            assert response.status_code == 200, response.text
            return response.json()["choices"][0]["text"]

    with ThreadPoolExecutor(4) as pool:
        texts = dict(zip(prompts, pool.map(ask, list(prompts))))
    for name, prompt in prompts.items():
        assert texts[name] == peft_text(demo_dir, adapter_dirs, name, tokenizer.encode(prompt)), name
    assert len(set(texts.values())) == 4


def test_adapter_streaming_and_adapter_id_agree(lora_server):
    body = {"prompt": "x = [", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    with lora_server.client() as http:
        by_model = http.post("/v1/completions", json={**body, "model": "mlp"}).json()["choices"][0]["text"]
        by_id = http.post("/v1/completions", json={**body, "model": MODEL_NAME, "adapter_id": "mlp"})
        assert by_id.json()["choices"][0]["text"] == by_model
        base = http.post("/v1/completions", json={**body, "model": MODEL_NAME}).json()["choices"][0]["text"]
        assert base != by_model
        with http.stream("POST", "/v1/completions", json={**body, "model": "mlp", "stream": True}) as r:
            chunks = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    import json
    assert chunks[-1] == "[DONE]"
    assert "".join(json.loads(c)["choices"][0]["text"] for c in chunks[:-1]) == by_model


def test_adapter_drop_field_changes_output_and_drop_all_is_base(lora_server):
    body = {"model": "qv", "prompt": "while True:", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    with lora_server.client() as http:
        full = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
        dropped_all = http.post("/v1/completions", json={**body, "adapter_drop": 2}).json()["choices"][0]["text"]
        base = http.post("/v1/completions", json={**body, "model": MODEL_NAME}).json()["choices"][0]["text"]
        bad = http.post("/v1/completions", json={**body, "adapter_drop": 9})
    assert dropped_all == base != full            # the demo model has 2 layers: dropping both = base
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "adapter_drop"


def test_models_lists_adapters_with_parent(lora_server):
    with lora_server.client() as http:
        data = http.get("/v1/models").json()["data"]
    assert [m["id"] for m in data] == [MODEL_NAME, "dora", "mlp", "qv"]
    assert all(m["parent"] == MODEL_NAME for m in data[1:]) and data[0]["parent"] is None


@pytest.mark.parametrize("field", ["model", "adapter_id"])
def test_unknown_adapter_is_404(lora_server, field):
    body = {"model": MODEL_NAME, "prompt": "x", "max_tokens": 2, field: "no-such-adapter"}
    with lora_server.client() as http:
        response = http.post("/v1/completions", json=body)
        chat = http.post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user",
                                                                                       "content": "hi"}]})
    assert response.status_code == 404 and chat.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "model_not_found" and "no-such-adapter" in error["message"]
