"""Adapter slots reused across kinds and target modules: after any sequence of loads, unloads and requests,
every greedy output equals the request run solo (issue #11 A: a LoRA in slot 1 failed once a DoRA on other
modules was installed into a reused slot 0, because the DoRA's new k/o stacks held one slot)."""
from __future__ import annotations

import random

import pytest

from tests.http.adapter_zoo import ZOO, SoloReference, greedy, save_zoo
from tests.http.conftest import make_engine

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


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_loads_unloads_requests_give_solo_outputs(demo_dir, zoo, solo, seed):
    """Random loads / unloads / replacements and mixed batches on an engine with 3 slots, so slots are reused by
    adapters of other kinds and other target modules all the time."""
    rng = random.Random(seed)
    engine = make_engine(demo_dir, max_loras=3)
    loaded: set[str] = set()
    num_batches = 0
    for _ in range(24):
        op = rng.random()
        name = rng.choice(list(ZOO))
        if op < 0.35 and name not in loaded and len(loaded) < 3:
            engine.adapters.load(name, str(zoo[name]))
            loaded.add(name)
        elif op < 0.5 and name in loaded:
            engine.adapters.unload(name)
            loaded.discard(name)
        elif op < 0.6 and name in loaded:
            engine.adapters.load(name, str(zoo[name]), replace=True)
        else:
            names = [rng.choice([None, *sorted(loaded)]) for _ in range(rng.randint(1, 5))]
            prompts = [rng.choice(PROMPTS) for _ in names]
            max_tokens = rng.randint(1, 6)
            out = engine.generate(prompts, greedy(max_tokens), names)
            assert out == [list(solo.tokens(n, tuple(p), max_tokens)) for n, p in zip(names, prompts)], names
            num_batches += 1
        idle_blocks = sum(len(prefix.blocks) for prefix in engine.prefixes.prefixes.values())
        assert engine.scheduler.blocks.num_used == idle_blocks       # only the loaded prefixes' blocks
    assert num_batches >= 5
    assert all(h.refcount == 0 for h in engine.adapters.handles.values())
