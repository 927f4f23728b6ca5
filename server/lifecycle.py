"""Loading and unloading adapters while serving: what the admin routes and just-in-time loading call.

A load (POST /v1/load_lora_adapter, or a request naming an adapter that is not loaded but is in an
--adapter-dir) goes:
1. path confinement (adapters/paths.py) on the event loop: only stat / realpath, nothing is read;
2. read, validate and fold on the registry's loader thread (`submit_read`), while the engine keeps stepping;
3. the cheap part on the engine thread between two steps (`AsyncEngine.run`): register the name and, if there
   is room, copy the tensors into a device slot.
A failure at any point leaves the registry as it was. Any adapter kind the registry has a loader for can be
loaded this way (the kind is detected from adapter_config.json), whatever the route's name says.
"""
from __future__ import annotations

import asyncio
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from adapters.paths import AdapterRoots
from adapters.registry import AdapterExists, AdapterHandle
from server.async_engine import AsyncEngine
from server.protocol import MAX_INT32, Text

# An adapter name is what clients put in `model`: no control characters (NUL, newlines); "org/name" is fine.
AdapterName = Annotated[Text, Field(min_length=1, max_length=255, pattern=r"^[^\x00-\x1f\x7f]+$")]
AdapterPath = Annotated[Text, Field(min_length=1, max_length=4096, pattern=r"^[^\x00]+$")]


class LoadLoraAdapterRequest(BaseModel):
    """vLLM's body, plus `pinned` and `adapter_drop`."""
    model_config = ConfigDict(extra="ignore")

    lora_name: AdapterName
    lora_path: AdapterPath
    load_inplace: bool = False                  # replace a loaded adapter of that name (in-flight requests drain)
    pinned: bool = False                        # extension: keep it on the device, never evicted
    adapter_drop: int = Field(default=0, ge=0, le=MAX_INT32)  # extension: its default AdapterDrop layer


class UnloadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    lora_name: AdapterName
    lora_int_id: int | None = None              # vLLM's; ignored


class AdapterInfo(BaseModel):
    """One loaded adapter in GET /v1/adapters."""
    name: str
    kind: str                                   # "lora", "PREFIX_TUNING", ...
    path: str
    tier: Literal["device", "host", "disk"]
    pinned: bool
    rank: int | None
    num_bytes: int
    slot: int | None
    adapter_drop: int
    active_requests: int
    requests_served: int


class AdapterUsage(BaseModel):
    device_bytes: int
    max_device_bytes: int | None
    host_bytes: int
    max_host_bytes: int | None
    slots_used: int
    max_slots: int
    num_draining: int
    num_loading: int
    num_installs: int
    num_evictions: int
    num_host_evictions: int
    num_reloads: int


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterInfo]
    usage: AdapterUsage


class AdapterLifecycle:
    def __init__(self, async_engine: AsyncEngine, roots: AdapterRoots):
        self.async_engine = async_engine
        self.registry = async_engine.engine.adapters
        self.roots = roots
        self._just_in_time: dict[str, asyncio.Task] = {}     # name -> its load in progress

    async def load(self, name: str, path: str, *, replace: bool = False, pinned: bool = False,
                   drop_layers: int = 0) -> AdapterHandle:
        real = self.roots.resolve(path)
        self.registry.check_new(name, drop_layers, replace)             # fail before the slow read
        loaded = await asyncio.wrap_future(self.registry.submit_read(real))
        return await self.async_engine.run(
            lambda engine: engine.adapters.add(name, loaded, drop_layers, pinned=pinned, replace=replace))

    async def unload(self, name: str) -> AdapterHandle:
        return await self.async_engine.run(lambda engine: engine.adapters.unload(name))

    async def load_on_demand(self, name: str) -> bool:
        """Whether `name` is loaded, loading it from an --adapter-dir if it is there (once, however many
        requests ask for it meanwhile). Raises AdapterError for a bad or disallowed adapter."""
        if name in self.registry:
            return True
        path = self.roots.find(name)
        if path is None:
            return False
        task = self._just_in_time.get(name)
        if task is None:
            task = asyncio.ensure_future(self._load_once(name, path))
            self._just_in_time[name] = task
            task.add_done_callback(lambda t: self._just_in_time.pop(name, None) and None)
        await asyncio.shield(task)
        return True

    async def _load_once(self, name: str, path: str) -> None:
        try:
            await self.load(name, path)
        except AdapterExists:
            pass                                # loaded meanwhile through the admin route

    def describe(self) -> AdapterList:
        return AdapterList(data=self.registry.describe(), usage=self.registry.usage())
