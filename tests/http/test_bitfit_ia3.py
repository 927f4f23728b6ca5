"""BitFit and (IA)^3 adapters over HTTP: loaded by /v1/load_lora_adapter and just in time by name, served beside
the base; a bad checkpoint is a 400 naming the problem and the server keeps serving."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from peft import IA3Config

from tests.http.conftest import MODEL_NAME, TINY_MODEL, assert_serving, make_engine, serve
from tests.test_bitfit import bad_cases, tensor_name, write_bitfit
from tests.test_ia3_vs_peft import save_ia3


@pytest.fixture(scope="module")
def served(demo_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("bitfit-http")
    hidden, layers = TINY_MODEL["hidden_size"], TINY_MODEL["num_layers"]
    g = torch.Generator().manual_seed(0)
    write_bitfit(root / "bitfit", {tensor_name(layer, "down_proj"): torch.randn(hidden, generator=g)
                                   for layer in range(layers)})
    save_ia3(Path(demo_dir), IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                       feedforward_modules=["down_proj"]), root / "ia3", seed=1)
    bad = bad_cases(root / "bad", TINY_MODEL["vocab_size"], hidden, layers)
    thread, served = serve(make_engine(demo_dir), adapter_dirs=[str(root)])
    yield served, root, bad
    thread.stop()


def complete(http, model: str) -> str:
    r = http.post("/v1/completions", json={"model": model, "prompt": "hello there", "max_tokens": 8,
                                           "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_load_and_serve_beside_the_base(served):
    served, root, _ = served
    with served.client() as http:
        base = complete(http, MODEL_NAME)
        for name in ("bitfit", "ia3"):
            r = http.post("/v1/load_lora_adapter", json={"lora_name": f"{name}-loaded", "lora_path": name})
            assert r.status_code == 200, r.text
            loaded = complete(http, f"{name}-loaded")
            assert loaded != base
            assert complete(http, name) == loaded            # just in time, by its directory name
        listed = http.get("/v1/adapters").json()
        kinds = {a["name"]: a["kind"] for a in listed["data"]}
        assert kinds["bitfit-loaded"] == "bitfit" and kinds["ia3-loaded"] == "ia3"


def test_bad_bitfit_checkpoints_are_400s(served):
    served, root, bad = served
    with served.client() as http:
        for path, match in bad:
            rel = str(Path(path).relative_to(root))
            r = http.post("/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": rel})
            assert r.status_code == 400, (rel, r.text)
            error = r.json()["error"]
            assert error["code"] == "invalid_adapter", error
            assert re.search(match, error["message"]), (match, error["message"])
        assert_serving(http)
