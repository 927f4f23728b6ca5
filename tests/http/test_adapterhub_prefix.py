"""AdapterHub prefix tuning and MAM through HTTP: loaded by name with /v1/load_lora_adapter, requested by `model`
concurrently with a bottleneck adapter and the base, each answer AdapterHub's own greedy tokens
(tests/fixtures/adapterhub); an unservable option is a 400 naming it."""
from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
from transformers import AutoTokenizer

from server.config import EngineConfig
from server.engine import LLMEngine
from tests.http.conftest import serve
from tests.http.test_adapterhub import complete
from tests.test_adapterhub_vs_fixtures import Fixture

ADAPTERS = {"prefix": "adapterhub_prefix", "prefix_flat": "adapterhub_prefix", "mam": "adapterhub_union",
            "par_bn": "bottleneck"}


@pytest.fixture(scope="module")
def hub(tokenizer_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("hub-prefix-http")
    fixture = Fixture("llama", tokenizer_dir, root)
    gated = root / "adapters" / "gated"     # use_gating without the gate tensors: refused (tests/test_unipelt.py)
    shutil.copytree(fixture.dir / "prefix", gated)
    d = json.loads((gated / "adapter_config.json").read_text())
    d["config"]["use_gating"] = True
    (gated / "adapter_config.json").write_text(json.dumps(d))
    engine = LLMEngine(EngineConfig(model=str(fixture.base), served_model_name="base", kv_cache_memory="4MiB"))
    thread, served = serve(engine, adapter_dirs=[str(fixture.dir), str(root / "adapters")])
    with served.client() as http:
        yield fixture, gated, http
    thread.stop()


def test_prefix_and_mam_by_name(hub):
    fixture, _, http = hub
    for name in ADAPTERS:
        response = http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(fixture.dir / name)})
        assert response.status_code == 200, response.text
    listed = {a["name"]: a for a in http.get("/v1/adapters").json()["data"]}
    assert {name: a["kind"] for name, a in listed.items()} == ADAPTERS
    jobs = [(name, i) for name in [*ADAPTERS, "base"] for i in range(len(fixture.prompts))]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda job: complete(http, job[0], fixture.prompts[job[1]], fixture.max_new), jobs))
    tokenizer = AutoTokenizer.from_pretrained(str(fixture.base))
    for (name, i), text in zip(jobs, got):
        assert text == tokenizer.decode(fixture.expected(name, i)[0], skip_special_tokens=True), (name, i)


def test_gated_prefix_is_a_400_naming_the_option(hub):
    _, gated, http = hub
    response = http.post("/v1/load_lora_adapter", json={"lora_name": "gated", "lora_path": str(gated)})
    assert response.status_code == 400
    assert "use_gating=True" in response.json()["error"]["message"]
