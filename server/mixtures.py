"""`merged_adapters` on a request (LoRAX's field) -> one registry entry per distinct recipe.

The first request with a recipe reads its members' checkpoints, mixes them (adapters/mixture.py) on a worker
thread and writes the result as a PEFT checkpoint under a per-server temporary directory; the registry then
loads it like any adapter under the recipe's name ("mixture-" + a hash of the recipe). From then on it is an
ordinary entry: it has bytes, a tier, and is evicted device -> host -> disk (re-read from that checkpoint) like
the others. Later requests with the same recipe reuse it; concurrent first requests share one computation. It is
recomputed when a member has been replaced or unloaded since. At most `max_mixtures` mixtures stay registered:
beyond that the least recently used one no request is using is unloaded and its checkpoint deleted. In /metrics'
per-adapter counters all mixtures share the adapter label "merged_adapters" (recipes are unbounded, labels must
not be).
"""
from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import tempfile

from pydantic import BaseModel, ConfigDict, Field

from adapters.config import AdapterError
from adapters.mixture import MixtureError, MixtureRecipe, make_mixture
from kernels import cpu_threads
from server.errors import APIError

MAX_MIXTURES = 64
METRICS_LABEL = "merged_adapters"     # the adapter label of every mixture's requests in /metrics


class MergedAdapters(BaseModel):
    """LoRAX's `merged_adapters` (ids, weights, merge_strategy, density, majority_sign_method), plus PEFT's other
    combination types as merge_strategy values, `seed` (DARE's masks) and `svd_rank`. Values are checked by
    MixtureRecipe (HTTP 400 naming the field)."""
    model_config = ConfigDict(extra="ignore")

    ids: list[str] = Field(description="loaded LoRA adapters to mix (or names in an --adapter-dir)")
    weights: list[float] | None = Field(default=None, description="one per id; default: all 1")
    merge_strategy: str | None = Field(default=None, description="linear (default), ties, dare_linear, "
                                       "dare_ties; PEFT's cat, svd, ties_svd, dare_linear_svd, dare_ties_svd, "
                                       "magnitude_prune, magnitude_prune_svd")
    density: float | None = Field(default=None, description="fraction kept, in (0, 1]; ties / dare / prune only")
    majority_sign_method: str | None = Field(default=None, description="total (default) or frequency")
    seed: int = Field(default=0, ge=0, le=2**63 - 1, description="extension: DARE's random masks")
    svd_rank: int | None = Field(default=None, description="extension: rank of *svd results")

    def recipe(self) -> MixtureRecipe:
        return MixtureRecipe(tuple(self.ids), tuple(self.weights if self.weights is not None else
                                                    [1.0] * len(self.ids)),
                             self.merge_strategy or "linear", self.density, self.majority_sign_method or "total",
                             self.seed, self.svd_rank)


class Mixtures:
    def __init__(self, async_engine, lifecycle, max_mixtures: int = MAX_MIXTURES, root: str | None = None):
        engine = async_engine.engine
        self.async_engine = async_engine
        self.registry = engine.adapters
        self.spec = engine.runner.spec
        self.lifecycle = lifecycle            # just-in-time loading of members from an --adapter-dir
        self.max_mixtures = max_mixtures
        self.root = root or tempfile.mkdtemp(prefix="peftserve-mixtures-")
        self.made: dict[str, tuple] = {}     # mixture name -> the member handles it was made from
        self._pending: dict[str, asyncio.Task] = {}
        self._serial = itertools.count()
        self.num_computed = 0

    async def resolve(self, merged: MergedAdapters) -> str:
        """The registry name of `merged`'s mixture, computing and registering it first if needed. APIError 400
        for a bad recipe or members that cannot be mixed."""
        try:
            recipe = merged.recipe()
            members = await self._members(recipe)
            name = recipe.name
            if self.registry.handles.get(name) is not None and self.made.get(name) == members:
                return name
            task = self._pending.get(name)
            if task is None:
                task = asyncio.ensure_future(self._make(recipe, members))
                self._pending[name] = task
                task.add_done_callback(lambda _: self._pending.pop(name, None))
            await asyncio.shield(task)
            return name
        except MixtureError as exc:
            raise APIError(400, str(exc), param=exc.param, code="invalid_merged_adapters") from None
        except AdapterError as exc:
            raise APIError(400, f"merged_adapters: {exc}", param="merged_adapters.ids",
                           code="invalid_merged_adapters") from None

    def metrics_label(self, adapter: str | None) -> str | None:
        """Per-adapter metrics count every mixture under one label: clients can make any number of recipes."""
        return METRICS_LABEL if adapter is not None and adapter in self.made else adapter

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    async def _members(self, recipe: MixtureRecipe) -> tuple:
        handles = []
        for name in recipe.ids:
            if name not in self.registry and not await self.lifecycle.load_on_demand(name):
                raise MixtureError(f"merged_adapters: adapter {name!r} is not loaded (load it, or put it in an "
                                   f"--adapter-dir)", "merged_adapters.ids")
            handle = self.registry.handles.get(name)
            if handle is None:
                raise MixtureError(f"merged_adapters: adapter {name!r} was unloaded", "merged_adapters.ids")
            if handle.kind != "lora":
                raise MixtureError(f"merged_adapters: {name!r} is a {handle.kind} adapter; mixtures take LoRA "
                                   f"adapters", "merged_adapters.ids")
            handles.append(handle)
        return tuple(handles)

    async def _make(self, recipe: MixtureRecipe, members: tuple) -> None:
        name = recipe.name
        out = os.path.join(self.root, f"{name}-{next(self._serial)}")
        try:
            await asyncio.wrap_future(cpu_threads.submit(make_mixture, recipe, [h.path for h in members], self.spec,
                                                         out, name="mixture"))
            loaded = await asyncio.wrap_future(self.registry.submit_read(out))
            await self.async_engine.run(lambda engine: self._register(name, loaded, members))
        except BaseException:
            shutil.rmtree(out, ignore_errors=True)
            raise
        self.num_computed += 1

    def _register(self, name: str, loaded, members: tuple) -> None:
        """Engine thread."""
        old = self.registry.handles.get(name)
        self.registry.add(name, loaded, replace=old is not None)
        self.made[name] = members
        if old is not None:
            self._forget(old)
        self._trim(keep=name)

    def _trim(self, keep: str) -> None:
        mine = [h for n, h in self.registry.handles.items() if n in self.made and n != keep]
        idle = sorted((h for h in mine if h.refcount == 0), key=lambda h: h.last_used)
        for handle in idle[:max(0, len(mine) + 1 - self.max_mixtures)]:
            self.registry.unload(handle.name)
            self.made.pop(handle.name, None)
            self._forget(handle)

    def _forget(self, handle) -> None:
        """Delete a detached mixture's checkpoint once nothing can re-read it (no request uses it)."""
        if handle.refcount == 0 and handle.path.startswith(self.root + os.sep):
            shutil.rmtree(handle.path, ignore_errors=True)
