"""Union adapters: one adapter served by several runtimes, each acting on its part (AdapterHub `ConfigUnion`,
architecture "union": MAM = prefix tuning + parallel bottleneck adapter; UniPELT = prefix + SeqBn + LoRA).

A checkpoint is one `adapter_config.json` {"config": {"architecture": "union", "configs": [sub-config, ...]}} and
one weights file holding every part's tensors under their usual AdapterHub names. Loading splits it by sub-config:
`adapters.config.adapterhub_kind(sub-config)` names the part's kind, the runtime serving that kind reads its part
with `load_part(path, sub-config, tensors)` (popping the tensors it uses); a tensor no part claims is an error.

The union runtime owns no tensors and no hooks. It installs the parts into the adapter's one slot of each part
runtime, removes them from there, and hands the engine the prefix part's K/V (`virtual_kv`). Per step the part
runtimes see the adapter's tokens as theirs through the handle's `part_kinds` (adapters/interface.py `has_kind`),
so e.g. a MAM request's tokens are in the bottleneck runtime's groups and its block table starts with its prefix.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from adapters.bottleneck import read_adapterhub_weights
from adapters.config import ADAPTERHUB_UNION, CONFIG_NAME, AdapterError, adapterhub_kind, read_config_json
from adapters.interface import AdapterRuntime, PrefixKV, VirtualTokens


@dataclass
class UnionWeights:
    """One union adapter: {part kind: that part's weights container}, in the union's config order."""
    path: str
    parts: dict[str, object] = field(default_factory=dict)

    @property
    def part_kinds(self) -> tuple[str, ...]:
        return tuple(self.parts)

    @property
    def num_bytes(self) -> int:
        return sum(getattr(w, "num_bytes", 0) for w in self.parts.values())

    @property
    def rank(self) -> int | None:
        ranks = [r for r in (getattr(w, "rank", None) for w in self.parts.values()) if r is not None]
        return max(ranks) if ranks else None

    @property
    def num_virtual_tokens(self) -> int | None:
        counts = [getattr(w, "num_virtual_tokens", None) for w in self.parts.values()]
        return next((c for c in counts if c is not None), None)

    @property
    def first_position(self) -> int | None:
        return next((w.first_position for w in self.parts.values() if isinstance(w, PrefixKV)), None)


class UnionRuntime(AdapterRuntime):
    """Serves union adapters through `parts`: the runtimes that can load a union part (`load_part`)."""
    name = "union"
    kinds = (ADAPTERHUB_UNION,)

    def __init__(self, parts: list[AdapterRuntime]):
        self.by_kind = {kind: rt for rt in parts if rt.load_part is not None for kind in rt.kinds}
        # a part with virtual tokens binds requests to KV blocks at admission: such parts are never evicted, and
        # the union kind takes the stricter setting of any part it may hold
        self.evictable = all(rt.evictable for rt in self.by_kind.values())
        self.installed: dict[int, list[AdapterRuntime]] = {}      # slot -> the runtimes holding its parts

    def load(self, path: str) -> UnionWeights:
        source = os.path.join(path, CONFIG_NAME)
        config = read_config_json(path).get("config")
        configs = config.get("configs") if isinstance(config, dict) else None
        if not isinstance(configs, list) or not configs:
            raise AdapterError(f"{source}: a union's \"configs\" must be a non-empty list of method configs")
        tensors, file = read_adapterhub_weights(path)
        weights = UnionWeights(path)
        for i, sub in enumerate(configs):
            where = f"{source}: configs[{i}]"
            kind = adapterhub_kind(sub, where)
            runtime = self.by_kind.get(kind)
            if runtime is None:
                served = ", ".join(sorted(self.by_kind))
                raise AdapterError(f"{where}: {kind} is not served as a part of a union (served parts: {served})")
            if kind in weights.parts:
                raise AdapterError(f"{where}: a second {kind} part; a union is served with one part of each kind")
            weights.parts[kind] = runtime.load_part(path, sub, tensors, where)
        if tensors:
            raise AdapterError(f"{file}: tensor(s) no part of the union uses: {', '.join(sorted(tensors))}")
        if sum(isinstance(w, (PrefixKV, VirtualTokens)) for w in weights.parts.values()) > 1:
            raise AdapterError(f"{source}: more than one part with virtual tokens")
        return weights

    def install(self, slot: int, weights: UnionWeights) -> None:
        installed = self.installed.setdefault(slot, [])
        for kind, part in weights.parts.items():
            installed.append(self.by_kind[kind])        # before: a failed install is removed too
            self.by_kind[kind].install(slot, part)

    def remove(self, slot: int) -> None:
        for runtime in self.installed.pop(slot, []):
            runtime.remove(slot)

    def virtual_kv(self, weights: UnionWeights) -> PrefixKV | VirtualTokens | None:
        for kind, part in weights.parts.items():
            kv = self.by_kind[kind].virtual_kv(part)
            if kv is not None:
                return kv
        return None
