"""Who runs this step and how many tokens each. Pure Python.

Policy (iteration-level continuous batching with chunked prefill):
1. Running sequences first, oldest first: each gets its pending tokens (1 for a decode, the rest of its
   prompt for a chunked prefill), within the step's token budget. If the KV cache cannot hold them, the
   newest running sequence is preempted (its blocks freed, its tokens recomputed later) until it can.
2. Then waiting sequences, in arrival order, while there are sequence slots, token budget and free blocks;
   a prompt longer than the remaining budget is prefilled in chunks over several steps.
Waiting requests never preempt running ones, so admission can't thrash; nothing is ever dropped.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from server.kv_blocks import BlockManager
from server.sequence import FinishReason, Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_tokens: int           # tokens to run this step, starting at seq.num_computed_tokens

    @property
    def is_last_chunk(self) -> bool:
        """After this step every token is in the cache, so the model's output here is sampled."""
        return self.seq.num_computed_tokens + self.num_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []      # in admission order: oldest first

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num = min(seq.num_pending_tokens, budget)
            while not self.blocks.can_allocate(self.blocks.blocks_needed(seq, num)):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break                               # seq preempted itself: nothing newer is left to run
            self.blocks.allocate(seq, num)
            out.scheduled.append(ScheduledSeq(seq, num))
            budget -= num
            i += 1

        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted:
            seq = self.waiting[0]
            num = min(seq.num_pending_tokens, budget)
            if not self.blocks.can_allocate(self.blocks.blocks_needed(seq, num)):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self.blocks.allocate(seq, num)
            out.scheduled.append(ScheduledSeq(seq, num))
            budget -= num
        return out

    def _preempt(self, seq: Sequence) -> None:
        """Recompute-style preemption: drop its KV, keep its tokens, queue it first."""
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Remove `seq` wherever it is and free its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
