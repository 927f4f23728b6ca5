"""Requests of whole-prompt kinds (UniPELT's gates, taken over the prompt at prefill; Sequence.whole_prompt), the
pure-Python side: the first prefill is one chunk, a recompute after preemption may be chunked (the gates are
kept), the prefix cache neither serves nor stores their blocks, and a prefix is copied per request."""
from __future__ import annotations

from server.kv_blocks import BlockManager
from server.sampling import SamplingParams
from server.scheduler import Scheduler
from server.sequence import Sequence
from tests.test_scheduler import advance


def gated(n_prompt: int, name: str = "g", num_virtual: int = 0) -> Sequence:
    s = Sequence(name, list(range(1, n_prompt + 1)), SamplingParams(max_tokens=100), num_virtual_tokens=num_virtual)
    s.whole_prompt = True
    return s


def test_first_prefill_waits_for_room_for_the_whole_prompt():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=10)
    a = Sequence("a", list(range(1, 9)), SamplingParams(max_tokens=100))
    sched.add(a)
    advance(sched.schedule())                      # a: 8-token prompt, now decoding (1 token per step)
    g = gated(10)
    sched.add(g)
    out = sched.schedule()                         # budget 10 - 1: the 10-token gated prompt waits
    assert [item.seq for item in out.scheduled] == [a] and g.num_computed_tokens == 0 and not g.block_table
    advance(out)
    sched.finish(a, None)
    out = sched.schedule()
    assert [(item.seq, item.num_tokens) for item in out.scheduled] == [(g, 10)]
    # an ungated prompt of the same length is chunked instead
    sched2 = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=10)
    b = Sequence("b", list(range(1, 9)), SamplingParams(max_tokens=100))
    sched2.add(b)
    advance(sched2.schedule())
    sched2.add(Sequence("c", list(range(1, 11)), SamplingParams(max_tokens=100)))
    assert [item.num_tokens for item in sched2.schedule().scheduled] == [1, 9]


def test_recompute_with_kept_gates_may_be_chunked():
    g = gated(10)
    assert g.needs_whole_prompt
    g.adapter_state["some_runtime"] = {"gate": 0.5}      # what a runtime keeps after the first prefill
    assert not g.needs_whole_prompt
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=4)
    sched.add(g)
    assert [item.num_tokens for item in sched.schedule().scheduled] == [4]


def test_prefix_cache_skips_whole_prompt_sequences():
    bm = BlockManager(32, 4, prefix_caching=True)
    plain, g = Sequence("p", list(range(1, 10)), SamplingParams(max_tokens=4)), gated(9)
    for s in (plain, g):
        bm.allocate(s, 9)
        s.num_computed_tokens = 9
        bm.cache_computed(s)
    assert len(bm.cache.entries) == 2              # the plain sequence's two full blocks only
    again = gated(9, "again")
    assert bm.attach_cached(again) == 0
    assert bm.attach_cached(Sequence("q", list(range(1, 10)), SamplingParams(max_tokens=4))) == 8


def test_prefix_blocks_are_copied_per_whole_prompt_sequence():
    bm = BlockManager(16, 4)
    prefix = bm.allocate_prefix(6)                 # 2 blocks, the adapter's reference
    bm.prefix_of = lambda s: prefix
    g = gated(5, num_virtual=6)
    assert bm.blocks_needed(g, 5) == 2 + 2         # its own 2 blocks and a copy of the prefix's 2
    bm.allocate(g, 5)
    own_copy = g.block_table[:2]
    assert set(own_copy).isdisjoint(prefix.blocks) and bm.take_copies() == list(zip(prefix.blocks, own_copy))
    assert [bm.ref_counts[b] for b in (*prefix.blocks, *own_copy)] == [1, 1, 1, 1]
    plain = Sequence("p", [1, 2], SamplingParams(max_tokens=4), num_virtual_tokens=6)
    bm.allocate(plain, 2)                          # an ungated request shares the adapter's blocks
    assert plain.block_table[:2] == list(prefix.blocks) and not bm.take_copies()
    free = bm.num_free
    bm.free(g)
    assert bm.num_free == free + 4 and all(bm.ref_counts[b] == 2 for b in prefix.blocks)
