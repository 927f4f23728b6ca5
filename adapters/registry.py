"""Adapter names -> handles, and where each adapter's weights live.

Three tiers (`AdapterHandle.tier`):
    device  installed in a slot of the model's per-slot stacks (`slot` set); requests can run
    host    kernel-ready tensors in CPU memory (`weights` set, no slot); a copy into a free slot makes it device
    disk    only the path: re-read and re-validated on a loader thread when a request needs it
Budgets are in bytes, not adapters: `max_device_bytes` over device adapters (one rank-128 adapter costs as much
as sixteen rank-8 ones), `max_host_bytes` over host-tier ones. Eviction is LRU, device -> host -> disk, and never:
    - takes a pinned adapter off the device (pinned: installed at load when room can be made, kept forever),
    - takes an adapter a running sequence uses off the device (the scheduler passes them as `busy`),
    - forgets the weights of an adapter any unfinished request uses (`refcount` > 0).
A runtime with `evictable = False` (prefix / prompt tuning: a request binds to its adapter's KV blocks when it
is added) has its adapters installed at load, or the load fails, and never evicted.
`slots[i]` (the handle installed in slot i) is the single source of truth for the device.

Unloading drains: the name goes at once (new requests get 404), the slot and weights are freed when the last
unfinished request using the adapter ends. `add(..., replace=True)` (vLLM's load_inplace) works the same way:
requests already queued finish on the old weights, later ones get the new.

Threads: every state change happens on the engine thread (or before it starts). `read()` (file IO, validation,
folding; adapters/reader.py) touches no state and runs on loader threads (`submit_read`); `describe()`, `get()` and
`in` may be called from any thread (the name table is guarded by a lock).
"""
from __future__ import annotations

import itertools
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import Enum

from adapters.config import AdapterError
from adapters.reader import CheckpointReader, LoadedAdapter


class AdapterNotFound(KeyError):
    pass


class AdapterExists(AdapterError):
    """A load names an adapter that is already loaded (and does not ask to replace it)."""


class Tier(str, Enum):
    DEVICE = "device"
    HOST = "host"
    DISK = "disk"


@dataclass(eq=False)
class AdapterHandle:
    name: str
    kind: str                      # "lora", ... (the runtime that serves it)
    path: str
    weights: object                # the kind's loaded container (LoraAdapter, ...); None on the disk tier
    slot: int | None = None        # row of the model's per-slot stacks; None off the device
    drop_layers: int = 0           # AdapterDrop default: skip the adapter in layers < drop_layers
    refcount: int = 0              # running or waiting requests using it
    requests_served: int = 0
    num_bytes: int = 0
    info: dict = field(default_factory=dict)
    pinned: bool = False
    last_used: int = 0             # LRU clock tick of the last acquire / install
    is_detached: bool = False      # unloaded or replaced; freed when refcount reaches 0

    @property
    def tier(self) -> Tier:
        if self.slot is not None:
            return Tier.DEVICE
        return Tier.HOST if self.weights is not None else Tier.DISK


class AdapterRegistry:
    def __init__(self, runtimes: dict, loaders: dict, num_layers: int, max_slots: int = 64,
                 max_device_bytes: int | None = None, max_host_bytes: int | None = None,
                 num_load_threads: int = 1):
        """`max_device_bytes` / `max_host_bytes`: None = no byte limit (the device is still `max_slots`)."""
        self.runtimes = runtimes           # kind -> runtime with install(slot, weights) / remove(slot)
        self.loaders = loaders             # kind -> callable(path) -> weights container
        self.num_layers = num_layers
        self.max_slots = max_slots
        self.max_device_bytes = max_device_bytes
        self.max_host_bytes = max_host_bytes
        self.handles: dict[str, AdapterHandle] = {}
        self.slots: list[AdapterHandle | None] = [None] * max_slots
        self.draining: list[AdapterHandle] = []      # detached handles still used by requests
        self._lock = threading.RLock()
        self._clock = itertools.count(1)
        self.reader = CheckpointReader(loaders, max_device_bytes, num_load_threads)
        self.read = self.reader.read                          # path -> LoadedAdapter, on any thread
        self.read_observers = self.reader.observers           # fn(seconds, ok) after every read, on its thread
        self._reloads: dict[AdapterHandle, Future] = {}    # disk -> host reads in flight
        self._load_done = threading.Event()
        self.num_installs = 0                  # host -> device copies so far
        self.num_evictions = 0                 # device -> host
        self.num_host_evictions = 0            # host -> disk (weights dropped; re-read when next used)
        self.num_reloads = 0                   # disk -> host reads started

    # ---- lookups (any thread) ---------------------------------------------------------------------------
    def get(self, name: str) -> AdapterHandle:
        handle = self.handles.get(name)
        if handle is None:
            raise AdapterNotFound(name)
        return handle

    def __contains__(self, name: str) -> bool:
        return name in self.handles

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self.handles)

    def describe(self) -> list[dict]:
        """One dict per loaded adapter, sorted by name (GET /v1/adapters)."""
        with self._lock:
            return [dict(name=h.name, kind=h.kind, path=h.path, tier=h.tier.value, pinned=h.pinned,
                         rank=h.info.get("rank"), num_bytes=h.num_bytes, slot=h.slot, adapter_drop=h.drop_layers,
                         active_requests=h.refcount, requests_served=h.requests_served)
                    for h in sorted(self.handles.values(), key=lambda h: h.name)]

    def usage(self) -> dict:
        with self._lock:
            return dict(device_bytes=self.device_bytes, max_device_bytes=self.max_device_bytes,
                        host_bytes=self.host_bytes, max_host_bytes=self.max_host_bytes,
                        slots_used=sum(h is not None for h in self.slots), max_slots=self.max_slots,
                        num_draining=len(self.draining), num_loading=len(self._reloads),
                        num_installs=self.num_installs, num_evictions=self.num_evictions,
                        num_host_evictions=self.num_host_evictions, num_reloads=self.num_reloads)

    @property
    def device_bytes(self) -> int:
        return sum(h.num_bytes for h in self.slots if h is not None)

    @property
    def host_bytes(self) -> int:
        return sum(h.num_bytes for h in self._all() if h.tier is Tier.HOST)

    # ---- reading (any thread, no state) -----------------------------------------------------------------
    def tier_usage(self) -> dict[str, tuple[int, int]]:
        """tier name -> (adapters, bytes) over the loaded (named) adapters; every tier present."""
        usage = {tier.value: (0, 0) for tier in Tier}
        with self._lock:
            for handle in self.handles.values():
                count, num_bytes = usage[handle.tier.value]
                usage[handle.tier.value] = (count + 1, num_bytes + handle.num_bytes)
        return usage

    def submit_read(self, path: str) -> Future:
        """`read(path)` on a loader thread; a Future of the LoadedAdapter."""
        return self.reader.submit(path)

    # ---- the name table (engine thread) -----------------------------------------------------------------
    def load(self, name: str, path: str, drop_layers: int = 0, *, pinned: bool = False,
             replace: bool = False) -> AdapterHandle:
        """Read, validate and register `path` as `name` in one call (startup, tests, benchmarks)."""
        self.check_new(name, drop_layers, replace)
        return self.add(name, self.read(path), drop_layers, pinned=pinned, replace=replace)

    def check_new(self, name: str, drop_layers: int = 0, replace: bool = False) -> None:
        """The checks `add` makes before touching anything, to fail before a slow read."""
        if not name:
            raise AdapterError("adapter name is empty")
        if any(ord(c) < 32 or c == "\x7f" for c in name):
            raise AdapterError(f"adapter name {name!r} contains control characters")
        if name in self.handles and not replace:
            raise AdapterExists(f"The lora adapter '{name}' has already been loaded. If you want to load the "
                                f"adapter in place, set 'load_inplace' to True.")
        if not 0 <= drop_layers <= self.num_layers:
            raise AdapterError(f"adapter_drop must be in [0, {self.num_layers}], got {drop_layers}")

    def add(self, name: str, loaded: LoadedAdapter, drop_layers: int = 0, *, pinned: bool = False,
            replace: bool = False) -> AdapterHandle:
        """Register a `read` adapter as `name` (replacing the old one when `replace`). It goes on the device
        now if that needs no eviction (pinned: evicting adapters no request uses), else stays on the host."""
        with self._lock:
            self.check_new(name, drop_layers, replace)
            handle = AdapterHandle(name, loaded.kind, loaded.path, loaded.weights, drop_layers=drop_layers,
                                   num_bytes=loaded.num_bytes, info=dict(loaded.info), pinned=pinned,
                                   last_used=next(self._clock))
            if pinned:
                self._check_pinned_fits(handle)
                self.make_resident(handle, busy=None)
            elif not self._evictable_kind(handle.kind):
                if not self.make_resident(handle, busy=None):
                    raise AdapterError(f"no room on the device for {name!r} ({handle.num_bytes} bytes): "
                                       f"{self._device_usage()}, held by adapters in use")
            else:
                self._check_fits_beside_pinned(handle)
                self._install_if_room(handle)
            old = self.handles.get(name)
            self.handles[name] = handle
            if old is not None:
                self._detach(old)
            self._enforce_host_budget()
            return handle

    def unload(self, name: str) -> AdapterHandle:
        """Forget `name` now; its slot and weights are freed once no unfinished request uses it."""
        with self._lock:
            handle = self.handles.pop(name, None)
            if handle is None:
                raise AdapterNotFound(name)
            self._detach(handle)
            return handle

    # ---- requests (engine thread) -----------------------------------------------------------------------
    def acquire(self, handle: AdapterHandle) -> None:
        """A request will use `handle`: count it, and start reading its weights back if they are on disk.
        AdapterError if it can never be put on the device (pinned adapters leave it no room)."""
        self._check_fits_beside_pinned(handle)
        handle.refcount += 1
        handle.requests_served += 1
        handle.last_used = next(self._clock)
        if handle.weights is None:
            self._start_reload(handle)

    def release(self, handle: AdapterHandle) -> None:
        """A request using `handle` finished (or was aborted)."""
        assert handle.refcount > 0, handle.name
        handle.refcount -= 1
        if handle.refcount == 0:
            with self._lock:
                if handle.is_detached:
                    self._free(handle)
                else:
                    self._enforce_host_budget()

    def make_resident(self, handle: AdapterHandle, busy: set | None) -> bool:
        """Whether `handle` is on the device, installing it now if that is possible by evicting LRU adapters
        that are neither pinned nor in `busy` (None: not used by any request). False if its weights are on
        disk (a read is started) or the device is full of adapters that can't be evicted."""
        if handle.slot is not None:
            handle.last_used = next(self._clock)
            return True
        if handle.weights is None:
            self._start_reload(handle)
            return False
        with self._lock:
            victims = self._victims(handle.num_bytes, busy)
            if victims is None:
                return False
            for victim in victims:
                self._evict(victim)
            self._install(handle, self.slots.index(None))
            self._enforce_host_budget()
            return True

    # ---- disk -> host reads in flight (engine thread) ---------------------------------------------------
    def has_pending_loads(self) -> bool:
        return bool(self._reloads)

    def wait_for_loads(self, timeout: float) -> None:
        """Block until some read in flight finishes or `timeout` seconds pass."""
        self._load_done.clear()
        if self._reloads and not any(f.done() for f in self._reloads.values()):
            self._load_done.wait(timeout)

    def poll_loads(self) -> list[tuple[AdapterHandle, Exception]]:
        """Put finished reads' weights back on the host tier; returns the reads that failed."""
        failed = []
        for handle, future in list(self._reloads.items()):
            if not future.done():
                continue
            del self._reloads[handle]
            try:
                loaded = future.result()
                if loaded.kind != handle.kind:
                    raise AdapterError(f"{handle.path}: now holds a {loaded.kind} adapter, was {handle.kind}")
            except Exception as exc:           # the checkpoint changed on disk since it was loaded
                failed.append((handle, exc))
                continue
            with self._lock:
                if handle.weights is None and (handle.refcount or not handle.is_detached):
                    handle.weights, handle.num_bytes = loaded.weights, loaded.num_bytes
                    self._enforce_host_budget()
        return failed

    def close(self) -> None:
        self.reader.close()

    # ---- internals --------------------------------------------------------------------------------------
    def _all(self) -> list[AdapterHandle]:
        return [*self.handles.values(), *self.draining]

    def _start_reload(self, handle: AdapterHandle) -> None:
        if handle not in self._reloads:
            future = self.submit_read(handle.path)
            self._reloads[handle] = future
            self.num_reloads += 1
            future.add_done_callback(lambda _: self._load_done.set())

    def _evictable_kind(self, kind: str) -> bool:
        return getattr(self.runtimes[kind], "evictable", True)

    def _check_pinned_fits(self, handle: AdapterHandle) -> None:
        pinned = [h for h in self.handles.values() if h.pinned and h.name != handle.name]
        if len(pinned) + 1 > self.max_slots:
            raise AdapterError(f"cannot pin {handle.name!r}: all {self.max_slots} device slots are pinned")
        used = sum(h.num_bytes for h in pinned)
        if self.max_device_bytes is not None and used + handle.num_bytes > self.max_device_bytes:
            raise AdapterError(f"cannot pin {handle.name!r} ({handle.num_bytes} bytes): pinned adapters already "
                               f"use {used} of the {self.max_device_bytes}-byte device budget")

    def _check_fits_beside_pinned(self, handle: AdapterHandle) -> None:
        if handle.pinned or handle.slot is not None:
            return
        fixed = [h for h in self._all() if (h.pinned or not self._evictable_kind(h.kind)) and h is not handle]
        used = sum(h.num_bytes for h in fixed)
        if len(fixed) >= self.max_slots or (self.max_device_bytes is not None
                                            and used + handle.num_bytes > self.max_device_bytes):
            kinds = " and ".join(what for what, present in (
                ("pinned adapters", any(h.pinned for h in fixed)),
                ("prefix / prompt-tuning adapters (never evicted)",
                 any(not h.pinned for h in fixed))) if present)
            budget = "" if self.max_device_bytes is None else f", {used} of {self.max_device_bytes} bytes"
            raise AdapterError(f"adapter {handle.name!r} ({handle.num_bytes} bytes) does not fit on the device "
                               f"beside the {kinds} ({len(fixed)} of {self.max_slots} slots{budget})")

    def _device_usage(self) -> str:
        """"3 of 4 slots used, 1000 of 4096 bytes" (no bytes part without a byte budget)."""
        used_slots = self.max_slots - self.slots.count(None)
        budget = "" if self.max_device_bytes is None else f", {self.device_bytes} of {self.max_device_bytes} bytes"
        return f"{used_slots} of {self.max_slots} slots used{budget}"

    def _install_if_room(self, handle: AdapterHandle) -> None:
        if None in self.slots and (self.max_device_bytes is None
                                   or self.device_bytes + handle.num_bytes <= self.max_device_bytes):
            self._install(handle, self.slots.index(None))

    def _victims(self, num_bytes: int, busy: set | None) -> list[AdapterHandle] | None:
        """Device adapters to evict so that `num_bytes` more and one slot fit: least recently used first,
        those no waiting request wants before those some do. None if not enough can be evicted."""
        def evictable(h: AdapterHandle) -> bool:
            return (not h.pinned and self._evictable_kind(h.kind)
                    and (h.refcount == 0 if busy is None else h not in busy))
        candidates = sorted((h for h in self.slots if h is not None and evictable(h)),
                            key=lambda h: (h.refcount > 0, h.last_used))
        free_bytes = None if self.max_device_bytes is None else self.max_device_bytes - self.device_bytes
        free_slots = self.slots.count(None)
        victims = []
        for victim in candidates:
            if free_slots >= 1 and (free_bytes is None or free_bytes >= num_bytes):
                break
            victims.append(victim)
            free_slots += 1
            if free_bytes is not None:
                free_bytes += victim.num_bytes
        if free_slots < 1 or (free_bytes is not None and free_bytes < num_bytes):
            return None
        return victims

    def _install(self, handle: AdapterHandle, slot: int) -> None:
        runtime = self.runtimes[handle.kind]
        try:
            runtime.install(slot, handle.weights)
        except BaseException:
            runtime.remove(slot)                # no half-installed slot
            raise
        handle.slot = slot
        self.slots[slot] = handle
        handle.last_used = next(self._clock)
        self.num_installs += 1

    def _evict(self, handle: AdapterHandle) -> None:
        """device -> host."""
        self.runtimes[handle.kind].remove(handle.slot)
        self.slots[handle.slot] = None
        handle.slot = None
        self.num_evictions += 1

    def _enforce_host_budget(self) -> None:
        """host -> disk, least recently used first, for adapters no request uses."""
        if self.max_host_bytes is None:
            return
        host = sorted((h for h in self._all() if h.tier is Tier.HOST), key=lambda h: h.last_used)
        total = sum(h.num_bytes for h in host)
        for handle in host:
            if total <= self.max_host_bytes:
                break
            if handle.refcount == 0 and not handle.pinned:
                handle.weights = None
                total -= handle.num_bytes
                self.num_host_evictions += 1

    def _detach(self, handle: AdapterHandle) -> None:
        handle.is_detached = True
        if handle.refcount == 0:
            self._free(handle)
        else:
            self.draining.append(handle)

    def _free(self, handle: AdapterHandle) -> None:
        if handle.slot is not None:
            self._evict(handle)
        handle.weights = None
        self._reloads.pop(handle, None)
        if handle in self.draining:
            self.draining.remove(handle)
