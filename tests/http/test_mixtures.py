"""`merged_adapters` on /v1/completions and /v1/chat/completions: the answer equals PEFT's add_weighted_adapter
on the same adapters; one registry entry per recipe (deterministic name, reused, evictable, recomputed when a
member changes); bad recipes are 400s and the server keeps serving."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PrefixTuningConfig

from adapters.mixture import MixtureRecipe
from tests.http.conftest import MODEL_NAME, assert_serving, make_engine, serve, serve_adapters
from tests.peft_fixtures import load_peft, save_adapter

ADAPTERS = {
    "qv": LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    "qo": LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "o_proj", "down_proj"], init_lora_weights=False),
    "r4": LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj"], init_lora_weights=False),
    "dora": LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj"], use_dora=True, init_lora_weights=False),
    "prefix": PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
}
TIES = {"ids": ["qv", "qo"], "weights": [0.9, 0.6], "merge_strategy": "ties", "density": 0.5}
PROMPT = [5, 17, 99, 3, 250, 8]
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def adapter_dirs(demo_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("mix-adapters")
    return {name: save_adapter(Path(demo_dir), cfg, root / name, seed=20 + i)
            for i, (name, cfg) in enumerate(ADAPTERS.items())}


@pytest.fixture(scope="module")
def mix_server(demo_dir, adapter_dirs):
    # two device slots, one held by the prefix adapter (never evicted), and no host tier: an idle LoRA goes
    # straight back to disk when another needs the slot
    thread, served = serve_adapters(make_engine(demo_dir, max_loras=2, max_host_adapter_memory=0), adapter_dirs)
    served.mixtures = thread.server.config.app.state.mixtures
    yield served
    thread.stop()


def complete(http, merged=None, model=MODEL_NAME, **extra):
    body = {"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
            "logprobs": 0, **extra}
    if merged is not None:
        body["merged_adapters"] = merged
    return http.post("/v1/completions", json=body)


def tokens_of(response) -> list[str]:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["logprobs"]["tokens"]


def peft_tokens(demo_dir, adapter_dirs, recipe: dict, seed: int = 0) -> list[int]:
    model = load_peft(Path(demo_dir), {i: adapter_dirs[i] for i in recipe["ids"]})
    model.add_weighted_adapter(recipe["ids"], recipe["weights"], "mix", combination_type=recipe["merge_strategy"],
                               density=recipe.get("density"))
    model.set_adapter("mix")
    out = model.generate(input_ids=torch.tensor([PROMPT]), max_new_tokens=MAX_TOKENS, do_sample=False)
    return out[0, len(PROMPT):].tolist()


def adapters_listed(http) -> dict:
    return {a["name"]: a for a in http.get("/v1/adapters").json()["data"]}


def test_mixture_equals_peft_and_is_one_registry_entry(mix_server, demo_dir, adapter_dirs):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(demo_dir)
    want = [tokenizer.decode([t]) for t in peft_tokens(demo_dir, adapter_dirs, TIES)]
    name = MixtureRecipe(("qv", "qo"), (0.9, 0.6), "ties", 0.5).name
    with mix_server.client() as http:
        computed = mix_server.mixtures.num_computed
        got = tokens_of(complete(http, TIES))
        assert got == want
        entry = adapters_listed(http)[name]
        assert entry["kind"] == "lora" and entry["num_bytes"] > 0 and entry["rank"] == 8
        assert mix_server.mixtures.num_computed == computed + 1
        # the same recipe again (weights as other JSON numbers, the model field ignored): the same entry
        again = dict(TIES, weights=[0.9, 0.6], majority_sign_method="total")
        assert tokens_of(complete(http, again, model="anything")) == want
        assert mix_server.mixtures.num_computed == computed + 1
        # the chat endpoint takes it too, and reuses the entry
        chat = http.post("/v1/chat/completions", json={
            "model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
            "temperature": 0, "merged_adapters": TIES})
        assert chat.status_code == 200, chat.text
        assert mix_server.mixtures.num_computed == computed + 1
        # members in the same server answer differently from the mixture (it is not one of them)
        assert tokens_of(complete(http, model="qv")) != want and tokens_of(complete(http, model="qo")) != want
        # evictable: the member requests above took the only device slot, and with no host tier the idle
        # mixture went to disk; the next request re-reads it, without recomputing, and answers the same
        assert adapters_listed(http)[name]["tier"] == "disk"
        assert tokens_of(complete(http, TIES)) == want
        assert adapters_listed(http)[name]["tier"] == "device"
        assert mix_server.mixtures.num_computed == computed + 1


def test_dare_is_deterministic_per_seed(mix_server):
    dare = {"ids": ["qv", "qo"], "weights": [1.0, 1.0], "merge_strategy": "dare_linear", "density": 0.3}
    with mix_server.client() as http:
        first = tokens_of(complete(http, dare))
        assert tokens_of(complete(http, dare)) == first
        names = [n for n in adapters_listed(http) if n.startswith("mixture-")]
        other = tokens_of(complete(http, dict(dare, seed=7)))
        assert len([n for n in adapters_listed(http) if n.startswith("mixture-")]) == len(names) + 1
        assert other != first


def test_replaced_member_recomputes(demo_dir, adapter_dirs, tmp_path):
    engine = make_engine(demo_dir)
    for k in ("qv", "qo"):
        engine.adapters.load(k, str(adapter_dirs[k]))
    thread, served = serve(engine, adapter_dirs=[str(tmp_path)])
    mixtures = thread.server.config.app.state.mixtures
    try:
        with served.client() as http:
            before = tokens_of(complete(http, TIES))
            other = save_adapter(Path(demo_dir), ADAPTERS["qv"], tmp_path / "qv2", seed=99)
            response = http.post("/v1/load_lora_adapter", json={"lora_name": "qv", "lora_path": str(other),
                                                                  "load_inplace": True})
            assert response.status_code == 200, response.text
            after = tokens_of(complete(http, TIES))
            assert after != before and mixtures.num_computed == 2
    finally:
        thread.stop()


def test_at_most_max_mixtures_stay(demo_dir, adapter_dirs):
    thread, served = serve_adapters(make_engine(demo_dir), {k: adapter_dirs[k] for k in ("qv", "qo")})
    mixtures = thread.server.config.app.state.mixtures
    mixtures.max_mixtures = 2
    try:
        with served.client() as http:
            paths = []
            for w in (0.1, 0.2, 0.3):
                tokens_of(complete(http, {"ids": ["qv", "qo"], "weights": [w, 1.0]}))
                paths.append(mixtures.registry.get(MixtureRecipe(("qv", "qo"), (w, 1.0)).name).path)
            names = {n for n in adapters_listed(http) if n.startswith("mixture-")}
            assert names == {MixtureRecipe(("qv", "qo"), (w, 1.0)).name for w in (0.2, 0.3)}
            assert not Path(paths[0]).exists() and Path(paths[2]).exists()
    finally:
        thread.stop()


@pytest.mark.parametrize("merged,extra,param,text", [
    ({"ids": ["qv", "nope"], "weights": [1, 1]}, {}, "merged_adapters.ids", "'nope' is not loaded"),
    ({"ids": ["qv", "dora"], "weights": [1, 1]}, {}, "merged_adapters.ids", "DoRA"),
    ({"ids": ["qv", "prefix"], "weights": [1, 1]}, {}, "merged_adapters.ids", "prefix_tuning adapter"),
    ({"ids": ["qv", "r4"], "weights": [1, 1]}, {}, "merged_adapters.ids", "one rank"),
    ({"ids": ["qv", "qo"], "weights": [1]}, {}, "merged_adapters.weights", "2 ids but 1 weights"),
    ({"ids": [], "weights": []}, {}, "merged_adapters.ids", "empty"),
    ({"ids": ["qv", "qo"], "merge_strategy": "ties"}, {}, "merged_adapters.density", "density is required"),
    ({"ids": ["qv", "qo"], "merge_strategy": "dare_ties", "density": 2}, {}, "merged_adapters.density", "(0, 1]"),
    ({"ids": ["qv", "qo"], "merge_strategy": "mean"}, {}, "merged_adapters.merge_strategy", "not one of"),
    ({"ids": ["qv", "qo"], "merge_strategy": "ties", "density": 0.5, "majority_sign_method": "x"}, {},
     "merged_adapters.majority_sign_method", "not one of"),
    ({"ids": ["qv", "qo"]}, {"adapter_id": "qv"}, "merged_adapters", "at most one"),
])
def test_bad_recipes_are_400(mix_server, merged, extra, param, text):
    with mix_server.client() as http:
        response = complete(http, merged, **extra)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == param and text in error["message"], error
        assert_serving(http)


def test_schema_errors_are_4xx(mix_server):
    with mix_server.client() as http:
        for bad in ({"weights": [1]}, {"ids": "qv"}, {"ids": ["qv"], "weights": ["x"]}, "qv"):
            response = complete(http, bad)
            assert response.status_code in (400, 422), response.text
            assert "merged_adapters" in response.json()["error"]["message"]
        assert_serving(http)


def test_concurrent_first_requests_compute_once(mix_server):
    from concurrent.futures import ThreadPoolExecutor
    recipe = {"ids": ["qo", "qv"], "weights": [0.3, 0.8], "merge_strategy": "dare_ties", "density": 0.6}
    computed = mix_server.mixtures.num_computed

    def ask(_):
        with mix_server.client() as http:
            return tokens_of(complete(http, recipe))
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, range(4)))
    assert all(a == answers[0] for a in answers)
    assert mix_server.mixtures.num_computed == computed + 1


def test_metrics_count_every_mixture_under_one_label(mix_server):
    from tests.http.conftest import metric_value
    with mix_server.client() as http:
        before = metric_value(http.get("/metrics").text, "peftserve_adapter_requests_total",
                              'adapter="merged_adapters"') or 0
        for w in (0.11, 0.12):
            tokens_of(complete(http, {"ids": ["qv", "qo"], "weights": [w, 1.0]}))
        text = http.get("/metrics").text
        assert metric_value(text, "peftserve_adapter_requests_total", 'adapter="merged_adapters"') == before + 2
        assert "mixture-" not in text


def test_lorax_generate_takes_parameters_merged_adapters(mix_server):
    """LoRAX's POST /generate: parameters.merged_adapters gives what /v1/completions gives for the recipe, from the
    same registry entry; a bad recipe is a 400 in LoRAX's error shape."""
    text = "def add(a, b):"
    with mix_server.client() as http:
        openai = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": text, "max_tokens": MAX_TOKENS,
                                                    "temperature": 0, "merged_adapters": TIES})
        assert openai.status_code == 200, openai.text
        computed = mix_server.mixtures.num_computed
        lorax = http.post("/generate", json={"inputs": text, "parameters": {"max_new_tokens": MAX_TOKENS,
                                                                            "merged_adapters": TIES}})
        assert lorax.status_code == 200, lorax.text
        assert lorax.json()["generated_text"] == openai.json()["choices"][0]["text"]
        assert mix_server.mixtures.num_computed == computed
        base = http.post("/generate", json={"inputs": text, "parameters": {"max_new_tokens": MAX_TOKENS}})
        assert base.json()["generated_text"] != lorax.json()["generated_text"]
        bad = http.post("/generate", json={"inputs": text, "parameters": {
            "merged_adapters": {"ids": ["qv", "qo"], "merge_strategy": "ties"}}})
        assert bad.status_code == 400 and "density is required" in bad.json()["error"], bad.text
        assert_serving(http)
