"""Runs the synchronous LLMEngine in its own thread and gives asyncio callers a stream of outputs per request.

Only the engine thread touches the engine. Callers talk to it through a command list (add / abort / call: run
a function on the engine, e.g. install or unload an adapter) that the thread drains between steps; outputs go
back through one `asyncio.Queue` per request, filled with `loop.call_soon_threadsafe`. When nothing is running
the thread sleeps on a condition variable.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from server.outputs import RequestFailed, RequestOutput
from server.sampling import SamplingParams

log = logging.getLogger(__name__)


class EngineOverloaded(RuntimeError):
    """Too many requests are waiting; the client should retry later (HTTP 503)."""


class EngineShutdown(RuntimeError):
    """The engine is not running (not started, or shut down)."""


@dataclass
class _Add:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None
    adapter_drop: int | None = None


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Call:
    fn: Callable[[Any], Any]                       # fn(engine), run on the engine thread between steps
    future: Future = field(default_factory=Future)


class _Stream:
    """Where one request's outputs go: a queue owned by the caller's event loop. `num_open`: its samples not
    finished yet (n > 1: each sample ends with its own final output)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, num_samples: int = 1):
        self.loop = loop
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.num_open = num_samples


class AsyncEngine:
    ADAPTER_STATS_EVERY_S = 0.5     # while stepping, the adapter registry's stats are read at most this often

    def __init__(self, engine, max_waiting: int | None = None):
        """`max_waiting` defaults to `engine.config.max_waiting`; more waiting requests -> EngineOverloaded."""
        self.engine = engine
        self.max_waiting = max_waiting if max_waiting is not None else engine.config.max_waiting
        self._cond = threading.Condition()
        self._commands: list[_Add | _Abort | _Call] = []   # guarded by _cond
        self._num_queued_adds = 0                     # adds not yet in the engine's stats; guarded by _cond
        self._streams: dict[str, _Stream] = {}        # guarded by _cond
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._stats: dict = {}                        # last engine.stats(), replaced by the engine thread
        self._adapter_stats_at = 0.0                  # time.monotonic() of the last stats with the adapters
        self._in_engine: dict[str, int] = {}          # id added to the engine -> its unfinished samples; engine thread

    # --- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stats = dict(self.engine.stats())
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="peftserve-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the engine thread; requests still in flight fail with EngineShutdown."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._cond:
            streams, self._streams = self._streams, {}
            commands, self._commands = self._commands, []
            self._num_queued_adds = 0
        for stream in streams.values():
            _deliver(stream, EngineShutdown("server is shutting down"))
        for command in commands:
            if isinstance(command, _Call) and command.future.set_running_or_notify_cancel():
                command.future.set_exception(EngineShutdown("server is shutting down"))

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def stats(self) -> dict:
        """The engine's stats as of its last iteration (safe to call from any thread); `num_waiting` also
        counts requests not yet handed to the engine."""
        with self._cond:
            return {**self._stats, "num_waiting": self._num_waiting_locked()}

    def _num_waiting_locked(self) -> int:
        return self._stats.get("num_waiting", 0) + self._num_queued_adds

    # --- requests --------------------------------------------------------------------------------------------
    async def generate(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None = None,
                       request_id: str | None = None,
                       adapter_drop: int | None = None) -> AsyncIterator[RequestOutput]:
        """Yield the request's output deltas until the one with `finished=True` (n > 1: of every sample).

        Raises the engine's error for a request it rejects (ParamError, ValueError), EngineOverloaded,
        EngineShutdown, or RequestFailed. Closing or cancelling the iterator early aborts the request.
        """
        request_id = request_id or uuid.uuid4().hex
        stream = _Stream(asyncio.get_running_loop(), params.num_samples)
        with self._cond:
            if not self.is_running:
                raise EngineShutdown("engine is not running")
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            num_waiting = self._num_waiting_locked()
            if num_waiting >= self.max_waiting:
                raise EngineOverloaded(f"server overloaded: {num_waiting} requests waiting "
                                       f"(max_waiting={self.max_waiting}); retry later")
            self._streams[request_id] = stream
            self._commands.append(_Add(request_id, list(prompt_ids), params, adapter, adapter_drop))
            self._num_queued_adds += 1
            self._cond.notify()
        finished = False
        num_open = params.num_samples
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                num_open -= item.finished
                finished = num_open == 0
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    async def run(self, fn: Callable[[Any], Any]) -> Any:
        """`fn(engine)`'s result, run on the engine thread between two steps (its exception is raised here)."""
        command = _Call(fn)
        with self._cond:
            if not self.is_running:
                raise EngineShutdown("engine is not running")
            self._commands.append(command)
            self._cond.notify()
        return await asyncio.wrap_future(command.future)

    def abort(self, request_id: str) -> None:
        """Stop a request and free its KV blocks; no more outputs are delivered for it. Unknown ids are ignored."""
        with self._cond:
            if self._streams.pop(request_id, None) is None:
                return
            self._commands.append(_Abort(request_id))
            self._cond.notify()

    # --- engine thread ---------------------------------------------------------------------------------------
    def _loop(self) -> None:
        paused_after_error = False      # engine still "has work" after a failed step: wait for a new command
        while True:
            with self._cond:
                while not (self._stopping or self._commands
                           or (not paused_after_error and self.engine.has_unfinished())):
                    self._cond.wait()
                if self._stopping:
                    return
                commands, self._commands = self._commands, []
            paused_after_error = paused_after_error and not commands
            for command in commands:
                self._apply(command)
            if commands:                # the applied adds now show in the engine's own num_waiting
                self._publish_stats(num_applied_adds=sum(isinstance(c, _Add) for c in commands),
                                    include_adapters=any(isinstance(c, _Call) for c in commands)
                                    or self._adapter_stats_due())
            if self.engine.has_unfinished() and not paused_after_error:
                try:
                    self._route(self.engine.step())
                except Exception as exc:
                    log.exception("engine step failed; failing the requests in flight")
                    self._fail_all(exc)
                    paused_after_error = True
                self._publish_stats(include_adapters=self._adapter_stats_due())

    def _adapter_stats_due(self) -> bool:
        """Whether the next publish reads the adapter registry too: the engine is idle, or the last read is older
        than ADAPTER_STATS_EVERY_S (adds and aborts do not change the registry; adapter calls (_Call) may)."""
        return (not self.engine.has_unfinished()
                or time.monotonic() - self._adapter_stats_at >= self.ADAPTER_STATS_EVERY_S)

    def _publish_stats(self, num_applied_adds: int = 0, include_adapters: bool = True) -> None:
        """Replace the published stats; without `include_adapters` only the engine's per-step ones (the adapter
        registry's, which take time in the number of adapters, are kept from the last full read)."""
        try:
            stats = dict(self.engine.stats(include_adapters=include_adapters))
        except Exception:
            log.exception("engine.stats() failed")
            stats, include_adapters = {}, False         # keep what was published
        if include_adapters:
            self._adapter_stats_at = time.monotonic()
        with self._cond:
            self._stats = stats if include_adapters else {**self._stats, **stats}
            self._num_queued_adds -= num_applied_adds

    def _apply(self, command: _Add | _Abort | _Call) -> None:
        if isinstance(command, _Abort):
            self._abort_in_engine(command.request_id)
            return
        if isinstance(command, _Call):
            if not command.future.set_running_or_notify_cancel():
                return                  # its caller went away before it ran: don't run it
            try:
                result = command.fn(self.engine)
            except Exception as exc:
                command.future.set_exception(exc)
            else:
                command.future.set_result(result)
            return
        try:
            self.engine.add_request(command.request_id, command.prompt_ids, command.params, command.adapter,
                                    command.adapter_drop)
            self._in_engine[command.request_id] = command.params.num_samples
        except Exception as exc:        # rejected (e.g. prompt too long): the caller sees this exception
            with self._cond:
                stream = self._streams.pop(command.request_id, None)
            if stream is not None:
                _deliver(stream, exc)
            else:                       # aborted before it was added: nothing to tell anyone
                log.debug("request %s rejected after its caller left: %s", command.request_id, exc)
            return
        with self._cond:
            gone = command.request_id not in self._streams
        if gone:                        # aborted while the add was queued; its _Abort may already have run
            self._abort_in_engine(command.request_id)

    def _abort_in_engine(self, request_id: str) -> None:
        self._in_engine.pop(request_id, None)
        try:
            self.engine.abort_request(request_id)
        except Exception:               # already finished or never added
            log.debug("abort of %s ignored by the engine", request_id, exc_info=True)

    def _route(self, outputs: list[RequestOutput]) -> None:
        """Hand each output to its request's queue; one call_soon_threadsafe per event loop per step."""
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        failed: list[str] = []          # requests with a failed sample: their other samples are aborted
        with self._cond:
            for output in outputs:
                rid = output.request_id
                if output.finished and rid in self._in_engine:
                    self._in_engine[rid] -= 1
                    if self._in_engine[rid] == 0 or output.error is not None:
                        del self._in_engine[rid]
                        failed += [rid] if output.error is not None else []
                stream = self._streams.get(rid)
                if stream is None:      # aborted by its caller; drop
                    continue
                if output.finished:
                    stream.num_open -= 1
                    if stream.num_open == 0 or output.error is not None:
                        del self._streams[rid]
                batches.setdefault(stream.loop, []).append((stream.queue, output.error or output))
        for rid in failed:
            self._abort_in_engine(rid)
        for loop, items in batches.items():
            _call_in_loop(loop, _put_all, items)

    def _fail_all(self, exc: Exception) -> None:
        """Fail every request the engine holds (a failed step leaves no way to tell which were in it)."""
        failed, self._in_engine = list(self._in_engine), {}
        with self._cond:
            streams = [self._streams.pop(request_id, None) for request_id in failed]
        message = f"internal error while generating ({type(exc).__name__}: {exc})"
        for request_id, stream in zip(failed, streams):
            self._abort_in_engine(request_id)
            if stream is not None:
                _deliver(stream, RequestFailed(message))


def _put_all(items) -> None:
    for queue, item in items:
        queue.put_nowait(item)


def _deliver(stream: _Stream, item) -> None:
    _call_in_loop(stream.loop, stream.queue.put_nowait, item)


def _call_in_loop(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:                # the caller's loop is closed: nobody is listening
        pass
