"""Scheduler fairness between adapters and admission by adapter residency: pure Python, a fake device.

The bound the scheduler keeps (server/scheduler.py): waiting requests sit in one FCFS queue per adapter, served
round-robin, so a request whose adapter has no other waiting request is admitted at the first step with a free
sequence slot in which no more than (number of other non-empty queues) admissions come before it. With prompts
that fit one step and max_num_seqs >= the number of queues, that is: admitted within M steps of arrival, M being
the most tokens any running request still has to generate, and finished M_own steps later. A flood of requests
for one adapter therefore costs another adapter's request at most one request's worth of waiting, not the flood.
"""
from __future__ import annotations

from server.kv_blocks import BlockManager
from server.sampling import SamplingParams
from server.scheduler import Scheduler
from server.sequence import FinishReason, Sequence, SequenceStatus


def seq(name: str, adapter=None, max_tokens: int = 8, n_prompt: int = 4) -> Sequence:
    return Sequence(name, list(range(1, n_prompt + 1)), SamplingParams(max_tokens=max_tokens), adapter)


class FakeDevice:
    """`capacity` adapter slots, LRU; adapters in `loading` have no weights yet (can't be made resident)."""

    def __init__(self, capacity: int, loading=()):
        self.capacity = capacity
        self.resident: list = []
        self.loading = set(loading)
        self.busy_seen: list[frozenset] = []

    def make_resident(self, adapter, busy: set) -> bool:
        self.busy_seen.append(frozenset(busy))
        if adapter in self.resident:
            return True
        if adapter in self.loading:
            return False
        if len(self.resident) >= self.capacity:
            idle = [a for a in self.resident if a not in busy]
            if not idle:
                return False
            self.resident.remove(idle[0])
        self.resident.append(adapter)
        return True


class Sim:
    """Drives a scheduler like the engine does: every step, computed tokens advance, last chunks sample a token,
    and a sequence with max_tokens outputs finishes."""

    def __init__(self, sched: Scheduler):
        self.sched = sched
        self.steps = 0
        self.finished_at: dict[str, int] = {}
        self.admitted: list[str] = []

    def step(self) -> None:
        out = self.sched.schedule()
        for item in out.scheduled:
            if item.seq.num_computed_tokens == 0:
                self.admitted.append(item.seq.request_id)
            last = item.is_last_chunk
            item.seq.num_computed_tokens += item.num_tokens
            if last:
                item.seq.append_token(7)
                if len(item.seq.output_ids) >= item.seq.params.max_tokens:
                    self.sched.finish(item.seq, FinishReason.LENGTH)
                    self.finished_at[item.seq.request_id] = self.steps
        self.steps += 1

    def run_until(self, done, limit: int = 1000) -> None:
        while not done():
            assert self.steps < limit, "did not finish"
            self.step()


def scheduler(max_num_seqs: int = 4, adapters=None) -> Scheduler:
    return Scheduler(BlockManager(4096, 4), max_num_seqs=max_num_seqs, max_num_batched_tokens=512,
                     adapters=adapters)


def test_flooded_adapter_does_not_starve_another():
    m_flood, m_other = 8, 4
    sched = scheduler(max_num_seqs=4)
    sim = Sim(sched)
    for i in range(40):
        sched.add(seq(f"a{i}", "A", m_flood))
    sim.step()                                   # the flood fills all 4 sequence slots
    sched.add(seq("b", "B", m_other))
    arrival = sim.steps
    sim.run_until(lambda: "b" in sim.finished_at)
    # bound (module docstring): admitted within m_flood steps, finished m_other steps later
    assert sim.finished_at["b"] - arrival < m_flood + m_other
    # FCFS would have run b after the 36 queued A requests: 9 more rounds of m_flood steps
    assert sim.admitted.index("b") <= 5
    sim.run_until(lambda: sched.num_unfinished == 0)
    assert len(sim.finished_at) == 41


def test_three_floods_and_a_single_request():
    sched = scheduler(max_num_seqs=4)
    sim = Sim(sched)
    for i in range(30):
        for adapter in ("A", "B", None):          # the base model is a queue like any adapter
            sched.add(seq(f"{adapter}{i}", adapter, 6))
    sim.step()
    sched.add(seq("d", "D", 3))
    arrival = sim.steps
    sim.run_until(lambda: "d" in sim.finished_at)
    assert sim.finished_at["d"] - arrival < 6 + 3


def test_queues_are_served_round_robin():
    sched = scheduler(max_num_seqs=9)
    for adapter in ("A", "B", None):
        for i in range(3):
            sched.add(seq(f"{adapter}{i}", adapter))
    assert [s.request_id for s in sched.waiting][:3] == ["A0", "A1", "A2"]
    out = sched.schedule()
    assert [i.seq.request_id for i in out.scheduled] == ["A0", "B0", "None0", "A1", "B1", "None1",
                                                        "A2", "B2", "None2"]
    assert sched.queues == {}


def test_adapter_still_loading_blocks_nobody():
    device = FakeDevice(capacity=4, loading={"X"})
    sched = scheduler(adapters=device)
    sim = Sim(sched)
    for name, adapter in (("x0", "X"), ("x1", "X"), ("base", None), ("a", "A")):
        sched.add(seq(name, adapter))
    sim.step()
    assert sim.admitted == ["base", "a"]
    assert [s.request_id for s in sched.waiting] == ["x0", "x1"]
    sim.step()
    assert sim.admitted == ["base", "a"]          # still loading: still skipped, others decode
    device.loading.clear()
    sim.step()
    assert sim.admitted == ["base", "a", "x0", "x1"]


def test_adapter_of_a_running_request_is_never_evicted():
    device = FakeDevice(capacity=1)
    sched = scheduler(adapters=device)
    sim = Sim(sched)
    sched.add(seq("a", "A", max_tokens=5))
    sim.step()
    sched.add(seq("b", "B", max_tokens=2))
    sched.add(seq("base", None, max_tokens=2))
    sim.step()
    assert sim.admitted == ["a", "base"]          # b waits for the only slot; the base request does not
    assert device.resident == ["A"] and "A" in device.busy_seen[-1]
    sim.run_until(lambda: "a" in sim.finished_at)
    sim.step()
    assert sim.admitted[-1] == "b" and device.resident == ["B"]
    sim.run_until(lambda: sched.num_unfinished == 0)


def test_preempted_request_goes_first_in_the_round():
    sched = Scheduler(BlockManager(4, 4), max_num_seqs=8, max_num_batched_tokens=100)
    a, b = seq("a", "A", n_prompt=8), seq("b", "B", n_prompt=8)
    sched.add(a)
    sched.add(b)
    Sim(sched).step()                            # both prefilled: every block used
    sched.add(seq("c", "C"))
    out = sched.schedule()                       # a needs a block: b (newest) is preempted
    assert out.preempted == [b]
    assert [s.request_id for s in sched.waiting] == ["b", "c"]
    sched.finish(a, FinishReason.STOP)
    assert [i.seq.request_id for i in sched.schedule().scheduled] == ["b", "c"]


def test_finishing_a_waiting_request_drops_its_empty_queue():
    sched = scheduler(max_num_seqs=1)
    first, waiting = seq("first", "A"), seq("w", "B")
    sched.add(first)
    sched.add(waiting)
    sched.schedule()
    sched.finish(waiting, FinishReason.ABORT)
    assert list(sched.queues) == [] and waiting.status is SequenceStatus.FINISHED
