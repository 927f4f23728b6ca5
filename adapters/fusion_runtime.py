"""AdapterHub AdapterFusion on the running model: a fusion is its own adapter kind, loaded from its fusion
directory, whose members are bottleneck adapters already loaded under the names in its adapter_fusion_config.json.

Loading resolves the member names against the registry (any thread: `registry.get`) and takes their weights
(re-read from their paths when they are on the disk tier); a member that is not loaded, or is not a bottleneck
adapter, is an AdapterError naming it (HTTP 400). The fusion then holds its members' modules itself: unloading or
evicting a member later does not change it, and a re-read of the fusion (disk tier) finds a member that is gone
at the path it had when the fusion was first loaded. The cost: members' weights sit on the device once more
inside each fusion that uses them.

Per step: per decoder layer, the rows of each fusion present (AdapterDrop leaves rows of layers below their first
layer out), and per sub-layer one batched op per fusion over all its members (adapters/fusion_stacks.py) — the
loop is over the distinct fusions of the step, not over requests.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from adapters.bottleneck import BottleneckAdapter, load_bottleneck
from adapters.config import ADAPTERHUB_FUSION, BOTTLENECK, AdapterError
from adapters.fusion import FusionAdapter, FusionConfig, load_fusion, read_fusion_config
from adapters.fusion_stacks import FusionStack, fused_sublayer
from adapters.interface import AdaptableModel, AdapterRuntime, StepLayout


@dataclass
class FusionStepView:
    groups: list[list[tuple[int, torch.Tensor | slice]]]    # per decoder layer: (fusion slot, its active rows)


class FusionRuntime(AdapterRuntime):
    name = "fusion"
    kinds = (ADAPTERHUB_FUSION,)

    def __init__(self, model: AdaptableModel):
        self.model = model
        weight = model.embed_tokens.weight
        self.dtype, self.device = weight.dtype, weight.device
        self.registry = None
        self.stacks: dict[int, dict[tuple[int, str], FusionStack]] = {}   # slot -> (layer, position) -> stack
        self._member_paths: dict[str, dict[str, str]] = {}                # fusion path -> member -> its path
        self._lock = threading.Lock()

    def bind(self, registry) -> None:
        self.registry = registry

    def load(self, path: str) -> FusionAdapter:
        spec = self.model.spec
        config = read_fusion_config(path)
        members = self._members(path, config)
        return load_fusion(path, config, members, spec.hidden_size, spec.num_layers)

    def _members(self, path: str, config: FusionConfig) -> list[BottleneckAdapter]:
        spec = self.model.spec
        with self._lock:
            known = dict(self._member_paths.get(path, {}))
        members, paths, missing, wrong = [], {}, [], []
        for name in config.adapter_names:
            handle = self.registry.handles.get(name) if self.registry is not None else None
            if handle is None:
                if name in known:
                    paths[name] = known[name]
                    members.append(load_bottleneck(known[name], spec.hidden_size, spec.num_layers))
                else:
                    missing.append(name)
                continue
            if handle.kind != BOTTLENECK:
                wrong.append(f"{name!r} is a {handle.kind} adapter")
                continue
            weights = handle.weights            # None on the disk tier
            if weights is None:
                weights = load_bottleneck(handle.path, spec.hidden_size, spec.num_layers)
            members.append(weights)
            paths[name] = handle.path
        if missing:
            raise AdapterError(f"{path}: AdapterFusion {config.name!r} fuses adapters that are not loaded: "
                               f"{', '.join(map(repr, missing))}; load its members "
                               f"({', '.join(config.adapter_names)}) under these names first, then the fusion")
        if wrong:
            raise AdapterError(f"{path}: AdapterFusion {config.name!r} fuses bottleneck adapters, but "
                               f"{'; '.join(wrong)}")
        with self._lock:
            self._member_paths[path] = paths
        return members

    def install(self, slot: int, fusion: FusionAdapter) -> None:
        self.stacks[slot] = {key: FusionStack.build(fusion, module, self.dtype, self.device)
                             for key, module in fusion.modules.items()}

    def remove(self, slot: int) -> None:
        self.stacks.pop(slot, None)

    def step_view(self, layout: StepLayout) -> FusionStepView | None:
        token_slots, token_first, _ = layout.slots_of(self.kinds)
        mine = [(row, slot, first) for row, (slot, first) in enumerate(zip(token_slots, token_first))
                if slot is not None]
        if not mine:
            return None
        thresholds = sorted({first for _, _, first in mine})
        by_count: dict[int, list] = {}        # one group list per distinct set of active rows
        groups = []
        for layer in range(self.model.spec.num_layers):
            count = sum(1 for t in thresholds if t <= layer)
            if count not in by_count:
                rows_of: dict[int, list[int]] = {}
                for row, slot, first in mine:
                    if first <= layer:
                        rows_of.setdefault(slot, []).append(row)
                by_count[count] = [(slot, self._rows(rows)) for slot, rows in sorted(rows_of.items())]
            groups.append(by_count[count])
        return FusionStepView(groups)

    def _rows(self, rows: list[int]) -> torch.Tensor | slice:
        if rows == list(range(rows[0], rows[0] + len(rows))):
            return slice(rows[0], rows[0] + len(rows))
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def on_sublayer(self, name: str, x: torch.Tensor, residual: torch.Tensor, out: torch.Tensor, h: torch.Tensor,
                    meta, layer) -> None:
        for slot, rows in meta.adapters[self.name].groups[layer.layer]:
            stack = self.stacks[slot].get((layer.layer, name))
            if stack is not None:
                h[rows] = fused_sublayer(out[rows], residual[rows], stack)
