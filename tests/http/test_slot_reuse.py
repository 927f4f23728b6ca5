"""Adapter slots reused across kinds and target modules: after any sequence of loads, unloads and requests,
every greedy output equals the request run solo (issue #11 A: a LoRA in slot 1 failed once a DoRA on other
modules was installed into a reused slot 0, because the DoRA's new k/o stacks held one slot)."""
from __future__ import annotations

import random

import pytest

from tests.http.adapter_zoo import ZOO, SoloReference, greedy, save_zoo
from tests.http.conftest import make_engine, serve

PROMPTS = [[5, 17, 300, 42], [900, 3, 3, 81, 7, 64, 12], [250], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]


@pytest.fixture(scope="module")
def zoo(demo_dir, tmp_path_factory):
    return save_zoo(demo_dir, tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="module")
def solo(demo_dir, zoo):
    return SoloReference(demo_dir, zoo)


def test_lora_after_slot_reuse_by_other_modules(demo_dir, zoo, solo):
    """The issue's sequence: prefix in slot 0, lora-mlp in slot 1; prefix unloaded; dora-ko into slot 0."""
    engine = make_engine(demo_dir)
    engine.adapters.load("prefix", str(zoo["prefix"]))
    engine.adapters.load("lora-mlp", str(zoo["lora-mlp"]))
    assert [engine.adapters.get(n).slot for n in ("prefix", "lora-mlp")] == [0, 1]
    engine.adapters.unload("prefix")
    engine.adapters.load("dora-ko", str(zoo["dora-ko"]))
    assert engine.adapters.get("dora-ko").slot == 0
    names = ["lora-mlp", "dora-ko", None, "lora-mlp"]
    out = engine.generate(PROMPTS, greedy(6), names)
    assert out == [list(solo.tokens(n, tuple(p), 6)) for n, p in zip(names, PROMPTS)]


@pytest.mark.parametrize("seed", range(12))
def test_random_loads_unloads_requests_give_solo_outputs(demo_dir, zoo, solo, seed):
    """A fresh engine with 3 slots; random loads, unloads and in-place replacements of adapters of every kind and
    target module, each followed by one mixed batch of every loaded adapter and the base: slots are reused by
    other kinds and other modules all the time, and stacks are created while higher slots are in use."""
    rng = random.Random(seed)
    engine = make_engine(demo_dir, max_loras=3)
    loaded: list[str] = []
    for _ in range(10):
        name = rng.choice(list(ZOO))
        if name not in loaded and len(loaded) < 3:
            engine.adapters.load(name, str(zoo[name]))
            loaded.append(name)
        elif name in loaded and rng.random() < 0.7:
            engine.adapters.unload(name)
            loaded.remove(name)
        elif name in loaded:
            engine.adapters.load(name, str(zoo[name]), replace=True)
        names = [None, *loaded]
        rng.shuffle(names)
        prompts = [rng.choice(PROMPTS) for _ in names]
        max_tokens = rng.randint(1, 4)
        out = engine.generate(prompts, greedy(max_tokens), names)
        assert out == [list(solo.tokens(n, tuple(p), max_tokens)) for n, p in zip(names, prompts)], names
        idle_blocks = sum(len(prefix.blocks) for prefix in engine.prefixes.prefixes.values())
        assert engine.scheduler.blocks.num_used == idle_blocks       # only the loaded prefixes' blocks
        assert all(h.refcount == 0 for h in engine.adapters.handles.values()) and not engine.adapters.draining


def test_issue_sequence_over_http_with_just_in_time_loading(demo_dir, zoo, solo):
    """#11 A as reported: --adapter-dir with prefix, lora-mlp and dora-ko, loaded just in time by requests."""
    thread, served = serve(make_engine(demo_dir), adapter_dirs=[str(zoo["prefix"].parent)])
    prompt = PROMPTS[1]

    def complete(http, model):
        body = {"model": model, "prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
        response = http.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["text"]

    try:
        with served.client() as http:
            for model in ("prefix", "lora-mlp"):
                complete(http, model)
            assert http.post("/v1/unload_lora_adapter", json={"lora_name": "prefix"}).status_code == 200
            assert complete(http, "dora-ko") == solo.text("dora-ko", tuple(prompt), 6)
            for _ in range(2):
                assert complete(http, "lora-mlp") == solo.text("lora-mlp", tuple(prompt), 6)
    finally:
        thread.stop()
