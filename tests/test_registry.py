"""The adapter registry on a running engine: byte budgets, LRU tiers device -> host -> disk, pinning, refcounts,
unload / replace of busy adapters (drain), failed loads and reloads. Truth: the same requests on an engine
with every adapter resident (itself checked against PEFT in test_lora_vs_peft.py)."""
from __future__ import annotations

import itertools
import shutil

import pytest
import torch
from peft import LoraConfig

from adapters.config import AdapterError
from adapters.registry import AdapterExists, AdapterNotFound
from server.config import EngineConfig
from server.engine import LLMEngine
from server.sampling import SamplingParams
from tests.peft_fixtures import save_adapter
from tests.test_model_vs_hf import make_prompts

ADAPTER = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
NAMES = [f"a{i}" for i in range(5)]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
_ids = itertools.count()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The model is 64 wide: a second intra-op thread only adds waiting, a lot of it on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def dirs(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    return {name: str(save_adapter(base, ADAPTER, root / name, seed=20 + i)) for i, name in enumerate(NAMES)}


def make_engine(base, **config) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(base), dtype="float32", kv_cache_memory="8MiB", block_size=4, **config))


@pytest.fixture(scope="module")
def reference(base, dirs) -> LLMEngine:
    """Every adapter resident, no budget."""
    engine = make_engine(base)
    for name, path in dirs.items():
        engine.adapters.load(name, path)
    return engine


@pytest.fixture(scope="module")
def size(reference) -> int:
    """Bytes of one adapter (all five have the same shapes)."""
    return reference.adapters.get("a0").num_bytes


def solo(reference, prompt, adapter) -> list[int]:
    return reference.generate([prompt], GREEDY, [adapter])[0]


def resident(reference, prompts, adapters) -> list[list[int]]:
    """The requests in one batch on the all-resident engine (batching changes no tokens: test_lora_vs_peft)."""
    return reference.generate(prompts, GREEDY, adapters)


def run(engine, requests, check=None) -> list[list[int]]:
    """requests: (arrival step, prompt, adapter); `check(engine)` after every step. Tokens per request."""
    ids = [f"r{next(_ids)}" for _ in requests]
    tokens = {rid: [] for rid in ids}
    pending = sorted(zip(ids, requests), key=lambda x: x[1][0])
    step = 0
    while pending or engine.has_unfinished():
        while pending and pending[0][1][0] <= step:
            rid, (_, prompt, adapter) = pending.pop(0)
            engine.add_request(rid, prompt, GREEDY, adapter)
        for out in engine.step():
            assert out.error is None, out.error
            tokens[out.request_id].extend(out.token_ids)
        if check is not None:
            check(engine)
        step += 1
    return [tokens[rid] for rid in ids]


def tiers(engine) -> dict[str, str]:
    return {h["name"]: h["tier"] for h in engine.adapters.describe()}


def test_more_adapters_than_the_budget_all_correct(base, dirs, reference, size):
    engine = make_engine(base, max_adapter_memory=int(2.5 * size), max_host_adapter_memory=size)
    for name in NAMES:
        engine.adapters.load(name, dirs[name])
    # device holds 2 (bytes), host 1; the rest were forgotten (disk), least recently used first
    assert tiers(engine) == {"a0": "device", "a1": "device", "a2": "disk", "a3": "disk", "a4": "host"}
    prompts = make_prompts(5, [5, 9, 3, 12, 7, 4, 10, 6, 8, 5, 11, 3])
    adapters = [NAMES[i % 5] if i % 6 else None for i in range(12)]
    arrivals = [0, 0, 0, 1, 1, 2, 3, 5, 5, 8, 9, 13]
    peak = []

    def check(e):
        peak.append(e.adapters.device_bytes)
        assert e.adapters.host_bytes <= size or any(h.refcount for h in e.adapters.handles.values())

    tokens = run(engine, list(zip(arrivals, prompts, adapters)), check)
    assert tokens == resident(reference, prompts, adapters)
    assert max(peak) <= 2.5 * size
    served = {h["name"]: h["requests_served"] for h in engine.adapters.describe()}
    assert served == {name: adapters.count(name) for name in NAMES}
    assert all(h.refcount == 0 for h in engine.adapters.handles.values())


def test_busy_adapter_stays_on_device_and_others_wait_without_blocking_base(base, dirs, reference, size):
    engine = make_engine(base, max_adapter_memory=int(1.5 * size))
    engine.adapters.load("a0", dirs["a0"])
    engine.adapters.load("a1", dirs["a1"])
    assert tiers(engine) == {"a0": "device", "a1": "host"}
    long = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompt_a, prompt_b, prompt_base = make_prompts(6, [6, 5, 4])
    engine.add_request("long", prompt_a, long, "a0")
    outputs = {"long": engine.step()[0].token_ids, "other": [], "base": []}
    engine.add_request("other", prompt_b, GREEDY, "a1")
    engine.add_request("base", prompt_base, GREEDY)
    while engine.has_unfinished():
        for out in engine.step():
            outputs[out.request_id].extend(out.token_ids)
        if engine.requests.get("long"):         # a0 runs: it is not evicted, so a1 can't come in
            assert tiers(engine)["a0"] == "device" and engine.requests["other"].seq.num_computed_tokens == 0
    assert len(outputs["base"]) == 8 and outputs["base"] == solo(reference, prompt_base, None)
    assert outputs["other"] == solo(reference, prompt_b, "a1")
    assert outputs["long"] == reference.generate([prompt_a], long, ["a0"])[0]
    assert tiers(engine) == {"a0": "host", "a1": "device"}


def test_unload_busy_adapter_drains(base, dirs, reference):
    engine = make_engine(base)
    engine.adapters.load("a0", dirs["a0"])
    prompt = make_prompts(7, [6])[0]
    engine.add_request("busy", prompt, GREEDY, "a0")
    tokens = []
    for _ in range(3):
        tokens += [t for out in engine.step() for t in out.token_ids]
    handle = engine.adapters.unload("a0")
    assert "a0" not in engine.adapters and handle.slot is not None      # gone by name, still installed
    with pytest.raises(AdapterNotFound):
        engine.add_request("late", prompt, GREEDY, "a0")
    while engine.has_unfinished():
        tokens += [t for out in engine.step() for t in out.token_ids]
    assert tokens == solo(reference, prompt, "a0")
    assert handle.slot is None and handle.weights is None
    assert engine.adapters.slots.count(None) == engine.adapters.max_slots and engine.adapters.draining == []
    with pytest.raises(AdapterNotFound):
        engine.adapters.unload("a0")


def test_replace_busy_adapter_old_requests_keep_old_weights(base, dirs, reference):
    engine = make_engine(base)
    engine.adapters.load("x", dirs["a0"])
    prompt = make_prompts(8, [5])[0]
    engine.add_request("old", prompt, GREEDY, "x")
    first = engine.step()[0].token_ids
    with pytest.raises(AdapterExists, match="already been loaded"):
        engine.adapters.load("x", dirs["a1"])
    old = engine.adapters.get("x")
    engine.adapters.load("x", dirs["a1"], replace=True)
    engine.add_request("new", prompt, GREEDY, "x")
    tokens = {"old": first, "new": []}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
    assert tokens["old"] == solo(reference, prompt, "a0")
    assert tokens["new"] == solo(reference, prompt, "a1") != tokens["old"]
    assert old.slot is None and engine.adapters.get("x").slot is not None


def test_pinned_adapter_is_never_evicted(base, dirs, reference, size):
    engine = make_engine(base, max_adapter_memory=int(2.5 * size))
    engine.adapters.load("a0", dirs["a0"], pinned=True)
    for name in ("a1", "a2", "a3"):
        engine.adapters.load(name, dirs[name])
    prompts = make_prompts(9, [4, 6, 5, 7, 3, 8])
    adapters = ["a1", "a2", "a3", "a0", "a2", "a1"]

    def check(e):
        assert tiers(e)["a0"] == "device"

    tokens = run(engine, [(i, p, a) for i, (p, a) in enumerate(zip(prompts, adapters))], check)
    assert tokens == resident(reference, prompts, adapters)
    engine.adapters.load("a4", dirs["a4"], pinned=True)          # 2 of 2.5 adapters' bytes now pinned
    assert tiers(engine) == {"a0": "device", "a1": "host", "a2": "host", "a3": "host", "a4": "device"}
    with pytest.raises(AdapterError, match="does not fit on the device beside the pinned adapters"):
        engine.add_request("no-room", prompts[0], GREEDY, "a1")
    with pytest.raises(AdapterError, match="pinned adapters already use"):
        engine.adapters.load("p", dirs["a1"], pinned=True)
    assert "p" not in engine.adapters and not engine.has_unfinished()


def test_adapter_larger_than_the_device_budget_is_refused(base, dirs, size):
    engine = make_engine(base, max_adapter_memory=size - 1)
    with pytest.raises(AdapterError, match="whole device budget"):
        engine.adapters.load("a0", dirs["a0"])
    assert "a0" not in engine.adapters


def test_failed_load_leaves_registry_as_it_was(base, dirs, tmp_path):
    engine = make_engine(base)
    engine.adapters.load("a0", dirs["a0"])
    before = (engine.adapters.describe(), list(engine.adapters.slots), engine.adapters.usage())
    bad = tmp_path / "bad"
    shutil.copytree(dirs["a1"], bad)
    weights = bad / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(AdapterError, match="truncated or corrupt"):
        engine.adapters.load("bad", str(bad))
    with pytest.raises(AdapterError, match="truncated or corrupt"):
        engine.adapters.load("a0", str(bad), replace=True)
    assert (engine.adapters.describe(), list(engine.adapters.slots), engine.adapters.usage()) == before


def test_disk_tier_reload_and_a_checkpoint_broken_meanwhile(base, dirs, reference, size, tmp_path):
    engine = make_engine(base, max_adapter_memory=size, max_host_adapter_memory=0)
    path = tmp_path / "a1"
    shutil.copytree(dirs["a1"], path)
    engine.adapters.load("a0", dirs["a0"])
    engine.adapters.load("a1", str(path))
    assert tiers(engine) == {"a0": "device", "a1": "disk"}
    prompt = make_prompts(10, [5])[0]
    assert engine.generate([prompt], GREEDY, ["a1"])[0] == solo(reference, prompt, "a1")   # read back
    assert tiers(engine) == {"a0": "disk", "a1": "device"}
    engine.adapters.load("a2", dirs["a2"])       # a load evicts nothing: no room, no host tier -> disk
    engine.generate([prompt], GREEDY, ["a0"])    # a0 is read back and evicts the idle a1 (to disk)
    assert tiers(engine)["a1"] == "disk"
    (path / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.raises(AdapterError, match="truncated or corrupt"):
        engine.generate([prompt], GREEDY, ["a1"])
    assert not engine.has_unfinished() and engine.adapters.get("a1").refcount == 0
    assert engine.generate([prompt], GREEDY, ["a0"])[0] == solo(reference, prompt, "a0")   # still serving
