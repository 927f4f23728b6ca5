"""Scheduler and KV-block accounting: pure Python, no model."""
from __future__ import annotations

import pytest

from server.kv_blocks import BlockManager
from server.sampling import SamplingParams
from server.scheduler import Scheduler
from server.sequence import FinishReason, Sequence, SequenceStatus


def seq(n_prompt: int, name: str = "r") -> Sequence:
    return Sequence(name, list(range(1, n_prompt + 1)), SamplingParams(max_tokens=100))


def advance(out, token: int = 7) -> None:
    """What the engine does after a step: mark tokens computed, append a token where the chunk finished."""
    for item in out.scheduled:
        last = item.is_last_chunk
        item.seq.num_computed_tokens += item.num_tokens
        if last:
            item.seq.append_token(token)


def test_block_manager_allocates_and_frees():
    bm = BlockManager(num_blocks=8, block_size=4)
    s = seq(9)
    assert bm.blocks_needed(s, 9) == 3
    bm.allocate(s, 9)
    assert len(s.block_table) == 3 and bm.num_free == 5
    s.num_computed_tokens = 9
    assert bm.blocks_needed(s, 3) == 0          # 12 tokens fit in 3 blocks
    assert bm.blocks_needed(s, 4) == 1
    bm.free(s)
    assert bm.num_free == 8 and s.block_table == []


def test_block_manager_refuses_overallocation():
    bm = BlockManager(num_blocks=2, block_size=4)
    with pytest.raises(RuntimeError, match="need 3 blocks"):
        bm.allocate(seq(12), 12)


def test_prefill_and_decode_share_a_step():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=100)
    a = seq(5, "a")
    sched.add(a)
    advance(sched.schedule())                    # a prefilled
    b = seq(6, "b")
    sched.add(b)
    out = sched.schedule()
    assert [(i.seq.request_id, i.num_tokens) for i in out.scheduled] == [("a", 1), ("b", 6)]


def test_chunked_prefill_respects_token_budget():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=10)
    a, b = seq(4, "a"), seq(24, "b")
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert [(i.seq.request_id, i.num_tokens) for i in out.scheduled] == [("a", 4), ("b", 6)]
    assert out.scheduled[0].is_last_chunk and not out.scheduled[1].is_last_chunk
    advance(out)
    out = sched.schedule()
    assert [(i.seq.request_id, i.num_tokens) for i in out.scheduled] == [("a", 1), ("b", 9)]
    advance(out)
    out = sched.schedule()
    assert [(i.seq.request_id, i.num_tokens) for i in out.scheduled] == [("a", 1), ("b", 9)]
    assert out.scheduled[1].is_last_chunk       # b's 24 tokens ran as chunks of 6, 9, 9


def test_max_num_seqs_limits_admission():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=100)
    for name in "abc":
        sched.add(seq(3, name))
    out = sched.schedule()
    assert [i.seq.request_id for i in out.scheduled] == ["a", "b"]
    assert [s.request_id for s in sched.waiting] == ["c"]


def test_waiting_request_waits_for_blocks_without_preempting():
    sched = Scheduler(BlockManager(4, 4), max_num_seqs=8, max_num_batched_tokens=100)
    a = seq(12, "a")
    sched.add(a)
    advance(sched.schedule())                    # a holds 3 of 4 blocks
    b = seq(8, "b")
    sched.add(b)
    out = sched.schedule()
    assert [i.seq.request_id for i in out.scheduled] == ["a"] and not out.preempted
    assert b.status is SequenceStatus.WAITING
    sched.finish(a, FinishReason.STOP)
    out = sched.schedule()
    assert [i.seq.request_id for i in out.scheduled] == ["b"]


def test_decode_preempts_newest_and_recomputes_it_later():
    sched = Scheduler(BlockManager(4, 4), max_num_seqs=8, max_num_batched_tokens=100)
    a, b = seq(8, "a"), seq(8, "b")
    sched.add(a)
    sched.add(b)
    advance(sched.schedule())                    # both prefilled: 4 blocks used, 9 tokens each now
    out = sched.schedule()                       # a needs a 3rd block: b (newest) is preempted
    assert out.preempted == [b]
    assert [(i.seq.request_id, i.num_tokens) for i in out.scheduled] == [("a", 1)]
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0 and b.block_table == []
    assert b.output_ids == [7]                   # generated tokens are kept and recomputed
    assert sched.waiting[0] is b
    sched.finish(a, FinishReason.STOP)
    out = sched.schedule()
    assert [(i.seq.request_id, i.num_tokens) for i in out.scheduled] == [("b", 9)]


def test_finish_frees_blocks_of_waiting_and_running():
    bm = BlockManager(16, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    a, b = seq(5, "a"), seq(5, "b")
    sched.add(a)
    sched.schedule()
    sched.add(b)
    sched.finish(b, FinishReason.ABORT)          # never ran
    sched.finish(a, FinishReason.ABORT)          # running
    assert bm.num_free == 16 and sched.num_unfinished == 0
    assert a.finish_reason is FinishReason.ABORT
