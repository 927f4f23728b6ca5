"""Adapter names -> handles: what is loaded, in which device slot, and who is using it.

The slot table is the single source of truth for which adapter's weights sit in the model's stacks.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field


from adapters.config import AdapterError, detect_kind


class AdapterNotFound(KeyError):
    pass


@dataclass(eq=False)
class AdapterHandle:
    name: str
    kind: str                      # "lora", ... (the runtime that serves it)
    path: str
    weights: object                # the kind's loaded container (LoraAdapter, ...)
    slot: int | None = None        # row of the model's per-slot stacks
    drop_layers: int = 0           # AdapterDrop default: skip the adapter in layers < drop_layers
    refcount: int = 0              # running or waiting requests using it
    requests_served: int = 0
    num_bytes: int = 0
    info: dict = field(default_factory=dict)


class AdapterRegistry:
    def __init__(self, runtimes: dict, loaders: dict, num_layers: int, max_slots: int = 64):
        self.runtimes = runtimes           # kind -> runtime with install(slot, weights) / remove(slot)
        self.loaders = loaders             # kind -> callable(path) -> weights container
        self.num_layers = num_layers
        self.max_slots = max_slots
        self.handles: dict[str, AdapterHandle] = {}
        self.slots: list[str | None] = [None] * max_slots

    def get(self, name: str) -> AdapterHandle:
        handle = self.handles.get(name)
        if handle is None:
            raise AdapterNotFound(name)
        return handle

    def __contains__(self, name: str) -> bool:
        return name in self.handles

    def load(self, name: str, path: str, drop_layers: int = 0) -> AdapterHandle:
        if name in self.handles:
            raise AdapterError(f"adapter {name!r} is already loaded")
        if not 0 <= drop_layers <= self.num_layers:
            raise AdapterError(f"adapter_drop must be in [0, {self.num_layers}], got {drop_layers}")
        path = os.path.abspath(path)
        kind = detect_kind(path)
        if kind not in self.loaders:
            raise AdapterError(f"{path}: adapter kind {kind!r} is not served yet")
        weights = self.loaders[kind](path)
        slot = self._free_slot()
        self.runtimes[kind].install(slot, weights)
        handle = AdapterHandle(name, kind, path, weights, slot, drop_layers,
                               num_bytes=getattr(weights, "num_bytes", 0))
        self.slots[slot] = name
        self.handles[name] = handle
        return handle

    def unload(self, name: str) -> None:
        handle = self.get(name)
        if handle.refcount:
            raise AdapterError(f"adapter {name!r} is in use by {handle.refcount} requests")
        self.runtimes[handle.kind].remove(handle.slot)
        self.slots[handle.slot] = None
        del self.handles[name]

    def _free_slot(self) -> int:
        for slot, owner in enumerate(self.slots):
            if owner is None:
                return slot
        raise AdapterError(f"all {self.max_slots} adapter slots are in use")
