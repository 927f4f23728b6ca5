"""Reading adapter checkpoints into kernel-ready weights: detect the kind, load and validate, on any thread.

Nothing here touches the registry's state, so reads run on loader threads (`submit`) while the engine serves;
the registry (adapters/registry.py) decides what a finished read becomes.
"""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

from adapters.config import AdapterError, detect_kind
from kernels import cpu_threads


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
        self._slots = threading.BoundedSemaphore(num_threads)   # reads at once
        self._closed = False

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
        """`read(path)` on a loader thread (one per read, ended with it: kernels/cpu_threads.py), at most
        `num_threads` reading at once; a Future of the LoadedAdapter."""
        if self._closed:
            raise RuntimeError("the checkpoint reader is closed")
        return cpu_threads.submit(self._read_in_turn, path, name="adapter-load")

    def _read_in_turn(self, path: str) -> LoadedAdapter:
        with self._slots:
            return self.read(path)

    def close(self) -> None:
        self._closed = True

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
