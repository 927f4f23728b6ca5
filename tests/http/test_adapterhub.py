"""AdapterHub adapters through HTTP: loaded by name with /v1/load_lora_adapter, requested by `model`, concurrent,
each answer AdapterHub's own greedy tokens (tests/fixtures/adapterhub); adapter_drop == skip_layers; an option we
cannot serve is a 400 naming it, and the server keeps serving."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from transformers import AutoTokenizer

from server.config import EngineConfig
from server.engine import LLMEngine
from tests.http.conftest import serve
from tests.test_adapterhub_vs_fixtures import Fixture

ADAPTERS = ["seq_bn", "double_seq_bn", "par_bn_mh_learned_gelu", "ia3"]


@pytest.fixture(scope="module")
def hub(tokenizer_dir, tmp_path_factory):
    fixture = Fixture("llama", tokenizer_dir, tmp_path_factory.mktemp("hub-http"))
    engine = LLMEngine(EngineConfig(model=str(fixture.base), served_model_name="base", kv_cache_memory="4MiB"))
    thread, served = serve(engine, adapter_dirs=[str(fixture.dir)])
    with served.client() as http:
        yield fixture, http
    thread.stop()


def complete(http, model: str, prompt: list[int], max_tokens: int, **extra) -> str:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            **extra}
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == max_tokens
    return response.json()["choices"][0]["text"]


def test_adapterhub_adapters_by_name(hub):
    fixture, http = hub
    for name in ADAPTERS:
        response = http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(fixture.dir / name)})
        assert response.status_code == 200, response.text
    kinds = {a["name"]: a["kind"] for a in http.get("/v1/adapters").json()["data"]}
    assert kinds == {"seq_bn": "bottleneck", "double_seq_bn": "bottleneck", "par_bn_mh_learned_gelu": "bottleneck",
                     "ia3": "adapterhub_ia3"}
    jobs = [(name, i, drop) for name in ADAPTERS for i in range(len(fixture.prompts)) for drop in (None,)]
    jobs += [("seq_bn", i, 1) for i in range(len(fixture.prompts))]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda job: complete(http, job[0], fixture.prompts[job[1]], fixture.max_new,
                                                 **({} if job[2] is None else {"adapter_drop": job[2]})), jobs))
    tokenizer = AutoTokenizer.from_pretrained(str(fixture.base))
    for (name, i, drop), text in zip(jobs, got):
        case = name if drop is None else f"{name}_skip{drop}"
        assert text == tokenizer.decode(fixture.expected(case, i)[0], skip_special_tokens=True), (case, i)
    assert len({text for text in got}) > len(ADAPTERS)          # the adapters answer differently


def test_unservable_option_is_a_400_naming_it(hub):
    fixture, http = hub
    response = http.post("/v1/load_lora_adapter", json={"lora_name": "post_add",
                                                        "lora_path": str(fixture.dir / "seq_bn_post_add")})
    assert response.status_code == 400
    assert "residual_before_ln='post_add'" in response.json()["error"]["message"]
    assert complete(http, "base", fixture.prompts[0], 2) is not None
