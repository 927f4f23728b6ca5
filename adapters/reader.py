"""Reading adapter checkpoints into kernel-ready weights: detect the kind, load and validate, on any thread.

Nothing here touches the registry's state, so reads run on loader threads (`submit`) while the engine serves;
the registry (adapters/registry.py) decides what a finished read becomes.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from adapters.config import AdapterError, detect_kind


@dataclass
class LoadedAdapter:
    """What `read` returns: a validated adapter, not yet registered under any name."""
    path: str
    kind: str
    weights: object
    num_bytes: int
    info: dict = field(default_factory=dict)     # "rank", "num_virtual_tokens", ... when the kind has them


class CheckpointReader:
    def __init__(self, loaders: dict[str, Callable[[str], object]], max_device_bytes: int | None = None,
                 num_threads: int = 1):
        """`loaders`: kind -> callable(path) -> weights container (the caller's dict, read at every call);
        `max_device_bytes`: an adapter larger than the whole device budget is refused at read time."""
        self.loaders = loaders
        self.max_device_bytes = max_device_bytes
        self.observers: list[Callable[[float, bool], None]] = []   # fn(seconds, ok) after every read
        self._num_threads = num_threads
        self._executor: ThreadPoolExecutor | None = None

    def read(self, path: str) -> LoadedAdapter:
        """Detect the kind, read and validate the checkpoint; AdapterError saying what is wrong. Every observer
        gets the read's duration and whether it succeeded."""
        start = time.monotonic()
        ok = False
        try:
            loaded = self._read(path)
            ok = True
            return loaded
        finally:
            for observe in self.observers:
                observe(time.monotonic() - start, ok)

    def submit(self, path: str) -> Future:
        """`read(path)` on a loader thread; a Future of the LoadedAdapter."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self._num_threads, thread_name_prefix="adapter-load")
        return self._executor.submit(self.read, path)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def _read(self, path: str) -> LoadedAdapter:
        path = os.path.abspath(path)
        kind = detect_kind(path)
        if kind not in self.loaders:
            raise AdapterError(f"{path}: adapter kind {kind!r} is not served yet")
        weights = self.loaders[kind](path)
        num_bytes = getattr(weights, "num_bytes", 0)
        if self.max_device_bytes is not None and num_bytes > self.max_device_bytes:
            raise AdapterError(f"{path}: the adapter needs {num_bytes} bytes on the device but the whole device "
                               f"budget (--max-adapter-memory) is {self.max_device_bytes} bytes")
        # what must be known while the weights are on disk: "rank", "num_virtual_tokens", "first_position" (prefix /
        # prompt tuning), "part_kinds" (a union adapter's parts: the runtimes that act on its tokens)
        info = {key: getattr(weights, key) for key in ("rank", "num_virtual_tokens", "first_position", "part_kinds")
                if getattr(weights, key, None) is not None}
        return LoadedAdapter(path, kind, weights, num_bytes, info)
