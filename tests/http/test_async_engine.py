"""AsyncEngine against a scripted fake engine: threading, abort on early exit, overload, step failures."""
import asyncio
import threading
from types import SimpleNamespace

import pytest

from server.async_engine import AsyncEngine, EngineOverloaded, EngineShutdown, RequestFailed
from server.outputs import RequestOutput
from server.sampling import ParamError, SamplingParams


class FakeEngine:
    """Emits one token ("t<n>") per request per step; `gate` (if set) blocks step(); `fail_next` raises once."""

    def __init__(self, max_len=100):
        self.config = SimpleNamespace(max_waiting=3)
        self.max_len = max_len
        self.requests: dict[str, list] = {}       # id -> [prompt_len, max_tokens, generated]
        self.aborted: list[str] = []
        self.thread_ids: set[int] = set()
        self.gate: threading.Event | None = None
        self.fail_next = False
        self.num_steps = 0
        self.stats_calls: list[bool] = []         # include_adapters of each stats() call

    def add_request(self, request_id, prompt_ids, params, adapter=None, adapter_drop=None):
        self.thread_ids.add(threading.get_ident())
        if len(prompt_ids) >= self.max_len:
            raise ParamError("prompt too long", "prompt")
        self.requests[request_id] = [len(prompt_ids), params.max_tokens, 0]

    def abort_request(self, request_id):
        self.thread_ids.add(threading.get_ident())
        del self.requests[request_id]
        self.aborted.append(request_id)

    def has_unfinished(self):
        return bool(self.requests)

    def step(self):
        self.thread_ids.add(threading.get_ident())
        self.num_steps += 1
        if self.gate is not None:
            self.gate.wait()
        threading.Event().wait(0.001)         # a step takes time
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("boom")
        outputs = []
        for rid, state in list(self.requests.items()):
            state[2] += 1
            done = state[2] >= state[1]
            outputs.append(RequestOutput(rid, [state[2]], f"t{state[2]}", None, done, "length" if done else None,
                                         state[0], state[2]))
            if done:
                del self.requests[rid]
        return outputs

    def stats(self, include_adapters=True):
        self.stats_calls.append(include_adapters)
        return {"num_running": len(self.requests), "num_waiting": 0}


@pytest.fixture
def fake():
    engine = FakeEngine()
    async_engine = AsyncEngine(engine)
    async_engine.start()
    yield engine, async_engine
    if engine.gate is not None:
        engine.gate.set()
    async_engine.shutdown()


async def collect(async_engine, max_tokens, **kw):
    return [out async for out in async_engine.generate([1, 2, 3], SamplingParams(max_tokens=max_tokens), **kw)]


def test_generate_streams_deltas_from_one_thread(fake):
    engine, async_engine = fake

    async def main():
        return await asyncio.gather(collect(async_engine, 3), collect(async_engine, 5))

    a, b = asyncio.run(main())
    assert [o.text for o in a] == ["t1", "t2", "t3"] and a[-1].finished and not any(o.finished for o in a[:-1])
    assert len(b) == 5 and b[-1].finish_reason == "length"
    assert len(engine.thread_ids) == 1 and threading.get_ident() not in engine.thread_ids
    assert not engine.requests and not engine.aborted


def test_adapter_stats_read_when_idle_and_at_most_every_interval_while_stepping(fake):
    """The registry's stats (time in the number of adapters) are left out of the per-step stats while requests
    run, read again at most every ADAPTER_STATS_EVERY_S, and always once the engine goes idle."""
    engine, async_engine = fake
    async_engine.ADAPTER_STATS_EVERY_S = 1e9
    asyncio.run(collect(async_engine, 20))
    # the publish after the add command (an add does not change the registry), then one after each of 20 steps
    assert engine.stats_calls[-21:] == [False] * 20 + [True]
    assert async_engine.stats()["num_running"] == 0

    engine.stats_calls.clear()
    async_engine.ADAPTER_STATS_EVERY_S = 0.0     # every step is past the interval
    asyncio.run(collect(async_engine, 5))
    assert engine.stats_calls[-5:] == [True] * 5


def test_idle_thread_does_not_spin(fake):
    engine, async_engine = fake
    asyncio.run(collect(async_engine, 2))
    steps = engine.num_steps
    threading.Event().wait(0.2)
    assert engine.num_steps == steps


def test_early_exit_aborts(fake):
    engine, async_engine = fake

    async def main():
        agen = async_engine.generate([1], SamplingParams(max_tokens=1000), request_id="r1")
        async for _ in agen:
            break
        await agen.aclose()

        task = asyncio.ensure_future(collect(async_engine, 1000, request_id="r2"))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):
            if not engine.requests:
                break
            await asyncio.sleep(0.01)

    asyncio.run(main())
    assert sorted(engine.aborted) == ["r1", "r2"] and not engine.requests


def test_rejected_request_raises_to_caller(fake):
    engine, async_engine = fake

    async def main():
        with pytest.raises(ParamError):
            async for _ in async_engine.generate(list(range(200)), SamplingParams()):
                pass
        return await collect(async_engine, 2)

    assert len(asyncio.run(main())) == 2


def test_overload_then_recovers(fake):
    engine, async_engine = fake
    engine.gate = threading.Event()

    async def main():
        first = asyncio.ensure_future(collect(async_engine, 2))     # taken into the (blocked) step
        await asyncio.sleep(0.1)
        queued = [asyncio.ensure_future(collect(async_engine, 2)) for _ in range(3)]
        await asyncio.sleep(0.05)
        with pytest.raises(EngineOverloaded):
            await collect(async_engine, 2)
        engine.gate.set()
        results = await asyncio.gather(first, *queued)
        return results, await collect(async_engine, 2)

    results, after = asyncio.run(main())
    assert all(len(r) == 2 for r in results) and len(after) == 2


def test_step_failure_fails_requests_and_keeps_serving(fake):
    engine, async_engine = fake
    engine.fail_next = True

    async def main():
        with pytest.raises(RequestFailed, match="boom"):
            await collect(async_engine, 3)
        return await collect(async_engine, 3)

    assert len(asyncio.run(main())) == 3
    assert async_engine.is_running


def test_shutdown_fails_in_flight_and_rejects_new(fake):
    engine, async_engine = fake
    engine.gate = threading.Event()

    async def main():
        task = asyncio.ensure_future(collect(async_engine, 5))
        await asyncio.sleep(0.05)
        stopper = threading.Thread(target=async_engine.shutdown)
        stopper.start()
        await asyncio.sleep(0.05)
        engine.gate.set()
        with pytest.raises(EngineShutdown):
            await task
        stopper.join()
        with pytest.raises(EngineShutdown):
            await collect(async_engine, 1)

    asyncio.run(main())
