"""Automatic prefix caching: reuse is exact (same tokens and logprobs as without it), only for the same tokens and
the same adapter (a reloaded adapter never hits its old blocks), evicted LRU under pressure, and every block
returns to the free pool."""
from __future__ import annotations

import random

import pytest
import torch
from peft import LoraConfig

from server.config import EngineConfig
from server.engine import LLMEngine
from server.kv_blocks import BlockManager
from server.sampling import SamplingParams
from server.sequence import Sequence
from tests.peft_fixtures import save_adapter

BS = 4
LORA = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"],
                  init_lora_weights=False)


# ---- policy (pure Python) --------------------------------------------------------------------------------------
def _seq(ids, adapter=None):
    return Sequence(f"r{random.getrandbits(32)}", ids, SamplingParams(max_tokens=4), adapter)


def _compute(blocks: BlockManager, seq: Sequence) -> None:
    """What the scheduler and engine do for one admission that prefills the whole rest of the prompt."""
    hit = blocks.attach_cached(seq)
    blocks.allocate(seq, seq.num_tokens - hit)
    seq.num_computed_tokens = seq.num_tokens
    blocks.cache_computed(seq)


def test_full_blocks_are_reused_and_the_last_token_always_runs():
    blocks = BlockManager(16, BS, prefix_caching=True)
    a = _seq(list(range(10, 19)))                          # 9 tokens: 2 full blocks
    _compute(blocks, a)
    b = _seq(list(range(10, 18)) + [99, 98])               # same 2 full blocks, then other tokens
    assert blocks.attach_cached(b) == 8
    assert b.block_table == a.block_table[:2] and b.num_computed_tokens == 8
    assert all(blocks.ref_counts[x] == 2 for x in a.block_table[:2])
    c = _seq(list(range(10, 18)))                          # exactly two blocks: the last token must run
    assert blocks.attach_cached(c) == 4
    d = _seq([10, 11, 12, 77, 14, 15, 16, 17, 18])         # differs inside the first block: nothing
    assert blocks.attach_cached(d) == 0 and d.block_table == []
    e = _seq([50, 51, 52, 53] + list(range(14, 19)))       # second block equal but first differs: nothing
    assert blocks.attach_cached(e) == 0


def test_same_tokens_other_adapter_never_share():
    blocks = BlockManager(16, BS, prefix_caching=True)

    class Handle:                                           # an adapter handle: identity is what counts
        kind = "lora"
    one, two = Handle(), Handle()
    ids = list(range(20, 33))
    a = _seq(ids, one)
    _compute(blocks, a)
    assert blocks.attach_cached(_seq(ids, two)) == 0
    assert blocks.attach_cached(_seq(ids)) == 0             # the base model neither
    assert blocks.attach_cached(_seq(ids, one)) == 12
    drop = _seq(ids, one)
    drop.first_adapter_layer = 1                            # AdapterDrop changes the K/V too
    assert blocks.attach_cached(drop) == 0


def test_released_blocks_stay_cached_and_are_evicted_lru_only_when_needed():
    blocks = BlockManager(6, BS, prefix_caching=True)
    a, b = _seq(list(range(100, 109))), _seq(list(range(200, 209)))    # 3 blocks each, 2 full
    _compute(blocks, a)
    _compute(blocks, b)
    assert blocks.num_free == 0
    blocks.free(a)                                          # released first: evicted first
    blocks.free(b)
    assert blocks.num_free == 6 and blocks.num_used == 0 and blocks.num_cached_free == 4
    c = _seq(list(range(300, 305)))                         # needs 2 blocks: the 2 never-cached ones first
    _compute(blocks, c)
    assert blocks.num_cached_free == 4
    d = _seq(list(range(400, 405)))                         # 2 more: a's cached blocks go (LRU), b's stay
    _compute(blocks, d)
    assert blocks.attach_cached(_seq(list(range(100, 109)))) == 0
    again = _seq(list(range(200, 209)))
    assert blocks.attach_cached(again) == 8
    for s in (again, c, d):
        blocks.free(s)
    assert blocks.num_used == 0 and all(r == 0 for r in blocks.ref_counts)


def test_evicted_parent_makes_children_unreachable():
    blocks = BlockManager(3, BS, prefix_caching=True)
    a = _seq(list(range(1, 10)))                            # blocks p (1-4), c (5-8), then a partial one
    _compute(blocks, a)
    p, c, _ = a.block_table
    blocks.free(a)
    x = _seq([7, 7, 7, 7, 7])                               # 2 blocks: the never-cached one, then p (LRU)
    _compute(blocks, x)
    assert p in x.block_table and not blocks.cache.is_cached(p) and blocks.cache.is_cached(c)
    blocks.free(x)
    assert blocks.attach_cached(_seq(list(range(1, 10)))) == 0      # c is still entered but unreachable


# ---- engine: exact, adapter-aware, bounded -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    base = tiny_model_dir("llama")
    root = tmp_path_factory.mktemp("prefix-cache")
    return base, {"a": save_adapter(base, LORA, root / "a", seed=1), "b": save_adapter(base, LORA, root / "b", seed=2)}


def _engine(base, adapters, caching: bool, kv="8MiB") -> LLMEngine:
    engine = LLMEngine(EngineConfig(model=str(base), dtype="float32", kv_cache_memory=kv, block_size=BS,
                                    enable_prefix_caching=caching, max_num_seqs=8))
    for name, path in adapters.items():
        engine.adapters.load(name, str(path))
    return engine


def _run(engine, requests, waves: int = 1):
    """requests: [(prompt, adapter)]; added in `waves` groups, each run to completion before the next.
    Returns per request (tokens, [logprob per token], [top-5 logprobs per token])."""
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=5)
    out = {}
    per_wave = -(-len(requests) // waves)
    for w in range(waves):
        ids = []
        for i, (prompt, adapter) in enumerate(requests[w * per_wave:(w + 1) * per_wave]):
            rid = f"w{w}-{i}"
            engine.add_request(rid, prompt, params, adapter)
            ids.append(rid)
            out[rid] = ([], [], [])
        while engine.has_unfinished():
            for o in engine.step():
                assert o.error is None
                out[o.request_id][0].extend(o.token_ids)
                for lp in o.logprobs or []:
                    out[o.request_id][1].append(lp.logprob)
                    out[o.request_id][2].append([v for _, v in lp.top])
    return [out[k] for k in sorted(out, key=lambda k: (int(k[1:].split("-")[0]), int(k.split("-")[1])))]


def _requests(adapters, n=12, seed=0):
    g = random.Random(seed)
    system = [g.randrange(3, 500) for _ in range(23)]       # 5 full blocks + 3 tokens
    reqs = []
    for i in range(n):
        tail = [g.randrange(3, 500) for _ in range(g.randint(1, 9))]
        reqs.append((system + tail, adapters[i % len(adapters)]))
    return reqs


def _assert_same(got, want):
    for (t1, l1, top1), (t2, l2, top2) in zip(got, want, strict=True):
        assert t1 == t2
        torch.testing.assert_close(torch.tensor(l1), torch.tensor(l2), atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.tensor(top1), torch.tensor(top2), atol=1e-5, rtol=0)


def test_outputs_identical_with_and_without_caching(setup):
    base, adapters = setup
    reqs = _requests([None, "a", "b"])
    cached = _engine(base, adapters, True)
    with_cache = _run(cached, reqs, waves=3)
    stats = cached.stats()
    assert stats["prefix_cache_hits"] > 0                   # later waves reused the shared prompt
    without = _run(_engine(base, adapters, False), reqs, waves=3)
    _assert_same(with_cache, without)
    blocks = cached.scheduler.blocks
    assert blocks.num_used == 0 and all(r == 0 for r in blocks.ref_counts)


def test_same_prompt_two_adapters_never_share(setup):
    base, adapters = setup
    prompt = list(range(40, 70))
    engine = _engine(base, adapters, True)
    first = _run(engine, [(prompt, "a")])
    hits = engine.stats()["prefix_cache_hits"]
    second = _run(engine, [(prompt, "b")])
    assert engine.stats()["prefix_cache_hits"] == hits      # b found nothing of a's
    assert second[0][0] != first[0][0]                       # and the adapters do differ
    _assert_same(second, _run(_engine(base, adapters, False), [(prompt, "b")]))
    _run(engine, [(prompt, "a")])
    assert engine.stats()["prefix_cache_hits"] == hits + 28  # a again: 7 full blocks, the last token runs


def test_reloaded_adapter_never_hits_old_blocks(setup):
    base, adapters = setup
    prompt = list(range(80, 110))
    engine = _engine(base, {"x": adapters["a"]}, True)
    _run(engine, [(prompt, "x")])
    hits = engine.stats()["prefix_cache_hits"]
    engine.adapters.load("x", str(adapters["b"]), replace=True)       # load_inplace with other weights
    got = _run(engine, [(prompt, "x")])
    assert engine.stats()["prefix_cache_hits"] == hits
    _assert_same(got, _run(_engine(base, adapters, False), [(prompt, "b")]))


def test_eviction_under_pressure_stays_exact(setup):
    base, adapters = setup
    # room for ~2-3 requests' blocks: every wave evicts earlier waves' cached blocks
    reqs = _requests([None, "a"], n=16, seed=3) + [(list(range(200, 240)), None) for _ in range(2)]
    small = _engine(base, adapters, True, kv="48KiB")
    assert small.runner.num_blocks < 40
    got = _run(small, reqs, waves=8)
    _assert_same(got, _run(_engine(base, adapters, False), reqs, waves=8))
    blocks = small.scheduler.blocks
    assert small.stats()["prefix_cache_hits"] > 0 and blocks.cache.num_evictions > 0
    assert blocks.num_used == 0 and all(r == 0 for r in blocks.ref_counts)
    assert len(blocks.free_blocks) + blocks.num_cached_free == blocks.num_blocks
