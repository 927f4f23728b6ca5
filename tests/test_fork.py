"""n samples of one prompt share its KV blocks: fork, copy-on-write, freeing. Pure Python, no model."""
from __future__ import annotations

from server.kv_blocks import BlockManager
from server.sampling import SamplingParams
from server.scheduler import Scheduler
from server.sequence import FinishReason, Sequence, SequenceStatus


def prompt_seq(n_prompt: int, name: str = "r", n: int = 1) -> Sequence:
    seq = Sequence(name, list(range(1, n_prompt + 1)), SamplingParams(max_tokens=100, n=n))
    seq.num_forks = n - 1
    return seq


def child_of(parent: Sequence, index: int) -> Sequence:
    child = Sequence(f"{parent.request_id}#{index}", parent.prompt_ids, parent.params)
    child.num_computed_tokens = parent.num_computed_tokens
    return child


def run_prefill(sched: Scheduler, parent: Sequence) -> list[Sequence]:
    """Schedule the parent's whole prompt, then fork its n-1 samples as the engine does."""
    out = sched.schedule()
    assert [item.seq for item in out.scheduled] == [parent]
    parent.num_computed_tokens += out.scheduled[0].num_tokens
    children = [child_of(parent, i) for i in range(1, parent.num_forks + 1)]
    for child in children:
        sched.fork(parent, child)
    parent.num_forks = 0
    for seq in [parent, *children]:
        seq.append_token(7)
    return [parent, *children]


def test_fork_shares_blocks_and_copies_the_partial_one_on_write():
    bm = BlockManager(num_blocks=16, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    parent = prompt_seq(10, n=3)                  # blocks [b0 full, b1 full, b2 half]
    sched.add(parent)
    samples = run_prefill(sched, parent)
    table = list(parent.block_table)
    assert len(table) == 3 and bm.num_used == 3                  # one prefill's blocks, held 3 times
    assert [bm.ref_counts[b] for b in table] == [3, 3, 3]
    assert all(s.block_table == table for s in samples)

    out = sched.schedule()                         # each sample writes its token 10 into block 2
    assert sorted(item.seq.request_id for item in out.scheduled) == ["r", "r#1", "r#2"]
    # the first two writers copy block 2; the last one owns it alone by then and writes in place
    assert len(out.block_copies) == 2 and all(src == table[2] for src, _ in out.block_copies)
    assert bm.num_used == 5
    assert [bm.ref_counts[b] for b in table[:2]] == [3, 3] and bm.ref_counts[table[2]] == 1
    last_blocks = {s.block_table[2] for s in samples}
    assert len(last_blocks) == 3 and {dst for _, dst in out.block_copies} | {table[2]} == last_blocks
    assert all(s.block_table[:2] == table[:2] for s in samples)

    for s in samples:
        s.num_computed_tokens += 1
    sched.finish(samples[1], FinishReason.STOP)    # one sample ends: the others keep the shared blocks
    assert [bm.ref_counts[b] for b in table[:2]] == [2, 2] and bm.num_used == 4
    sched.finish(samples[0], FinishReason.ABORT)
    sched.finish(samples[2], FinishReason.STOP)
    assert bm.num_used == 0 and bm.ref_counts == [0] * 16


def test_fork_of_a_block_aligned_prompt_copies_nothing():
    bm = BlockManager(num_blocks=16, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    parent = prompt_seq(8, n=2)
    sched.add(parent)
    samples = run_prefill(sched, parent)
    out = sched.schedule()
    assert out.block_copies == [] and len(out.scheduled) == 2
    assert bm.num_used == 4                        # 2 shared + one new block each
    for s in samples:
        sched.finish(s, FinishReason.STOP)
    assert bm.num_used == 0


def test_preempting_a_sample_keeps_the_shared_blocks_of_the_others():
    bm = BlockManager(num_blocks=3, block_size=4)      # exactly the prompt's blocks: no room for a copy
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    parent = prompt_seq(10, n=3)
    sched.add(parent)
    samples = run_prefill(sched, parent)
    shared = list(parent.block_table)
    out = sched.schedule()
    # the newest samples are preempted (each frees no block: the others hold them) until the parent holds the
    # partial block alone and writes into it without a copy
    assert [s.request_id for s in out.preempted] == ["r#2", "r#1"]
    assert [item.seq.request_id for item in out.scheduled] == ["r"] and out.block_copies == []
    assert all(s.status is SequenceStatus.WAITING and s.block_table == [] and s.num_computed_tokens == 0
               for s in samples[1:])
    assert [bm.ref_counts[b] for b in shared] == [1, 1, 1] and parent.block_table == shared
    parent.num_computed_tokens += 1
    sched.finish(parent, FinishReason.STOP)
    assert bm.num_used == 0
    out = sched.schedule()                          # a preempted sample recomputes prompt + its token alone
    assert [(item.seq.request_id, item.num_tokens) for item in out.scheduled] == [("r#1", 11)]
    for s in samples[1:]:
        sched.finish(s, FinishReason.ABORT)
    assert bm.num_used == 0 and bm.ref_counts == [0] * 3


def test_admission_reserves_sequence_slots_for_the_samples():
    bm = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=256)
    first = prompt_seq(4, "a")
    sched.add(first)
    sched.schedule()
    many = prompt_seq(4, "b", n=4)                 # needs 4 slots, 3 are left
    sched.add(many)
    assert sched.schedule().scheduled[0].seq is first and sched.running == [first]
    sched.finish(first, FinishReason.STOP)
    out = sched.schedule()                         # an empty batch takes it whatever n is
    assert [item.seq for item in out.scheduled] == [many]
