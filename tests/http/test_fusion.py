"""AdapterHub AdapterFusion through HTTP: loading a fusion before its members is a 400 naming them and the server
keeps serving; with its members loaded, the fusion dir loads by path through /v1/load_lora_adapter and answers
AdapterHub's own greedy tokens (tests/fixtures/adapterhub, case "fusion"), concurrently with its members."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from transformers import AutoTokenizer

from server.config import EngineConfig
from server.engine import LLMEngine
from tests.http.conftest import serve
from tests.http.test_adapterhub import complete
from tests.test_adapterhub_vs_fixtures import Fixture

FUSION = "fusion_fuse_a_fuse_b"


def test_fusion_over_http(tokenizer_dir, tmp_path):
    fixture = Fixture("llama", tokenizer_dir, tmp_path)
    engine = LLMEngine(EngineConfig(model=str(fixture.base), served_model_name="base", kv_cache_memory="4MiB"))
    thread, served = serve(engine, adapter_dirs=[str(fixture.dir)])
    try:
        with served.client() as http:
            def load(name: str, folder: str):
                return http.post("/v1/load_lora_adapter",
                                 json={"lora_name": name, "lora_path": str(fixture.dir / folder)})

            refused = load("fusion", FUSION)
            assert refused.status_code == 400, refused.text
            error = refused.json()["error"]
            assert error["code"] == "invalid_adapter" and error["type"] == "invalid_request_error"
            assert "not loaded: 'fuse_a', 'fuse_b'" in error["message"]
            assert complete(http, "base", fixture.prompts[0], 2) is not None        # still serving
            assert http.post("/v1/completions", json={"model": "fusion", "prompt": [5], "max_tokens": 1}
                             ).status_code == 404

            for name in ("fuse_a", "fuse_b"):
                assert load(name, name).status_code == 200
            loaded = load("fusion", FUSION)
            assert loaded.status_code == 200, loaded.text
            kinds = {a["name"]: a["kind"] for a in http.get("/v1/adapters").json()["data"]}
            assert kinds == {"fuse_a": "bottleneck", "fuse_b": "bottleneck", "fusion": "adapterhub_fusion"}
            jobs = [(name, i) for name in ("fusion", "fuse_a", "fuse_b") for i in range(len(fixture.prompts))]
            with ThreadPoolExecutor(6) as pool:
                got = list(pool.map(lambda job: complete(http, job[0], fixture.prompts[job[1]], fixture.max_new),
                                    jobs))
    finally:
        thread.stop()
    tokenizer = AutoTokenizer.from_pretrained(str(fixture.base))
    for (name, i), text in zip(jobs, got):
        assert text == tokenizer.decode(fixture.expected(name, i)[0], skip_special_tokens=True), (name, i)
