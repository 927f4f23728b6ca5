"""Who runs this step and how many tokens each. Pure Python.

Policy (iteration-level continuous batching with chunked prefill):
1. Running sequences first, oldest first: each gets its pending tokens (1 for a decode, the rest of its
   prompt for a chunked prefill), within the step's token budget. If the KV cache cannot hold them, the
   newest running sequence is preempted (its blocks freed, its tokens recomputed later) until it can.
2. Then waiting sequences, while there are sequence slots, token budget and free blocks; a prompt longer than
   the remaining budget is prefilled in chunks over several steps. Waiting sequences sit in one FCFS queue per
   adapter (the base model is one more), served round-robin: each admission takes the head of the queue
   served longest ago, so a flood of requests for one adapter delays a request for another by at most one
   admission per other busy queue, not by the whole flood.
   A head whose adapter is not on the device and cannot be put there now (its weights are still being read,
   or every slot holds an adapter a running sequence uses) is skipped this step, so it blocks nobody; a head
   that lacks KV blocks stops admission (so long prompts are not starved by short ones).
With prefix caching, an admitted sequence starts with the cached blocks of its longest cached prefix (same
tokens, same adapter) and only the rest of its tokens run (server/prefix_cache.py).
Waiting requests never preempt running ones, so admission can't thrash; nothing is ever dropped.
A waiting sequence that will fork into n samples once its prompt is computed (`num_forks` = n - 1) is admitted
only with sequence slots for all n (or into an empty batch); its samples share its blocks (kv_blocks.fork).
A sequence whose adapter takes values over the whole prompt (`needs_whole_prompt`: UniPELT's gates) is admitted
only into a step with budget for its whole prompt (a head that must wait stops admission, like one lacking blocks).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from server.kv_blocks import BlockManager
from server.sequence import FinishReason, Sequence, SequenceStatus


_NO_QUEUE = object()


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
    block_copies: list[tuple[int, int]] = field(default_factory=list)    # copy-on-write (src, dst), before run

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class AdapterResidency(Protocol):
    """Puts adapters on the device (the adapter registry)."""

    def make_resident(self, adapter, busy: set) -> bool:
        """Whether `adapter` is on the device, installing it now if that needs evicting only adapters that
        are not in `busy` (the adapters of running sequences)."""


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 adapters: AdapterResidency | None = None):
        """`adapters`: None = every adapter is always on the device."""
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.adapters = adapters
        # adapter (None = base) -> its waiting sequences, FCFS; dict order = round-robin order
        self.queues: dict[object, deque[Sequence]] = {}
        self.running: list[Sequence] = []      # in admission order: oldest first

    @property
    def waiting(self) -> list[Sequence]:
        """Waiting sequences in the order admission considers them: queue by queue, each FCFS."""
        return [seq for queue in self.queues.values() for seq in queue]

    @property
    def num_waiting(self) -> int:
        return sum(len(queue) for queue in self.queues.values())

    @property
    def num_unfinished(self) -> int:
        return self.num_waiting + len(self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.queues.setdefault(seq.adapter, deque()).append(seq)

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

        busy = {s.adapter for s in self.running if s.adapter is not None}
        skipped: set = set()                        # queues whose head's adapter can't be on the device now
        while budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted:
            key = next((k for k in self.queues if k not in skipped), _NO_QUEUE)
            if key is _NO_QUEUE:
                break
            queue = self.queues[key]
            seq = queue[0]
            hit = self.blocks.attach_cached(seq)    # cached leading blocks (prefix caching) count as computed
            num = min(seq.num_pending_tokens, budget)
            if seq.needs_whole_prompt and num < seq.num_pending_tokens:
                self._detach(seq)                   # waits for a step with room for its whole prompt
                break
            if not self.blocks.can_allocate(self.blocks.blocks_needed(seq, num)):
                self._detach(seq)
                break
            if self.running and len(self.running) + 1 + seq.num_forks > self.max_num_seqs:
                self._detach(seq)
                break
            if not self._make_resident(seq.adapter, busy):
                self._detach(seq)
                skipped.add(key)
                continue
            queue.popleft()
            del self.queues[key]                    # served: to the back of the round
            if queue:
                self.queues[key] = queue
            if seq.adapter is not None:
                busy.add(seq.adapter)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            if self.blocks.cache is not None:
                self.blocks.cache.count(seq.num_tokens, hit)
            self.blocks.allocate(seq, num)
            out.scheduled.append(ScheduledSeq(seq, num))
            budget -= num
        out.block_copies = self.blocks.take_copies()
        return out

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """`child` (a running sequence's other sample, same tokens and computed count) runs from now on,
        sharing `parent`'s blocks; newest in the batch, so preempted first."""
        self.blocks.fork(parent, child)
        child.status = SequenceStatus.RUNNING
        self.running.append(child)

    def _detach(self, seq: Sequence) -> None:
        """Undo attach_cached for a sequence that stays waiting."""
        self.blocks.free(seq)
        seq.num_computed_tokens = 0

    def _preempt(self, seq: Sequence) -> None:
        """Recompute-style preemption: drop its KV, keep its tokens, queue it first."""
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        queue = self.queues.pop(seq.adapter, None) or deque()
        queue.appendleft(seq)
        self.queues = {seq.adapter: queue, **self.queues}     # its queue goes first in the round

    def _make_resident(self, adapter, busy: set) -> bool:
        return adapter is None or self.adapters is None or self.adapters.make_resident(adapter, busy)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Remove `seq` wherever it is and free its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            queue = self.queues[seq.adapter]
            queue.remove(seq)
            if not queue:
                del self.queues[seq.adapter]
        self.blocks.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
