"""AdapterHub bottleneck adapters on the running model: after each attention / MLP sub-layer, the rows of this
step's bottleneck tokens get  h = adapter(o, r)  computed grouped by adapter (adapters/bottleneck_stacks.py).

Stacks exist per (layer, position) that some loaded adapter has a module at; every stack covers every slot in
use (a slot without a module there is the base model). AdapterDrop: a request whose first adapter layer is k is
left out of the groups of layers < k, which equals AdapterHub's `skip_layers=range(k)`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from adapters.bottleneck import (BottleneckAdapter, bottleneck_from, load_bottleneck, parse_math,
                                 take_bottleneck_tensors)
from adapters.bottleneck_stacks import SublayerStacks, TokenGroup, grouped_sublayer
from adapters.config import BOTTLENECK
from adapters.interface import AdaptableModel, AdapterRuntime, StepLayout


@dataclass
class BottleneckStepView:
    groups: list[TokenGroup | None]        # per decoder layer: its active bottleneck tokens (None: none)


class BottleneckRuntime(AdapterRuntime):
    name = "bottleneck"
    kinds = (BOTTLENECK,)

    def __init__(self, model: AdaptableModel):
        self.model = model
        weight = model.embed_tokens.weight
        self.dtype, self.device = weight.dtype, weight.device
        self.stacks: dict[tuple[int, str], SublayerStacks] = {}     # (layer, "attention" | "mlp") -> stacks
        self.adapters: dict[int, BottleneckAdapter] = {}            # slot -> its adapter

    def load(self, path: str) -> BottleneckAdapter:
        spec = self.model.spec
        return load_bottleneck(path, spec.hidden_size, spec.num_layers)

    def load_part(self, path: str, config: dict, tensors: dict[str, torch.Tensor], source: str
                  ) -> BottleneckAdapter:
        """The bottleneck part of a union adapter (MAM's parallel adapter)."""
        spec = self.model.spec
        mine = take_bottleneck_tensors(tensors)
        return bottleneck_from(path, config, parse_math(config, source), mine, path, source, spec.hidden_size,
                               spec.num_layers)

    def install(self, slot: int, adapter: BottleneckAdapter) -> None:
        self.adapters[slot] = adapter
        num_slots = max(self.adapters) + 1
        for key in set(self.stacks) | set(adapter.modules):
            if key not in self.stacks:
                self.stacks[key] = SublayerStacks(self.model.spec.hidden_size, self.dtype, self.device)
            self.stacks[key].set_slot(slot, adapter.modules.get(key), adapter.math, num_slots)

    def remove(self, slot: int) -> None:
        self.adapters.pop(slot, None)
        for stacks in self.stacks.values():
            stacks.clear_slot(slot)

    def step_view(self, layout: StepLayout) -> BottleneckStepView | None:
        token_slots, token_first, _ = layout.slots_of(self.kinds)
        mine = [(row, slot, first) for row, (slot, first) in enumerate(zip(token_slots, token_first))
                if slot is not None]
        if not mine:
            return None
        activation_of = {slot: adapter.math.non_linearity for slot, adapter in self.adapters.items()}
        by_first: dict[int, TokenGroup | None] = {}     # one group per distinct set of active tokens
        groups = []
        thresholds = sorted({first for _, _, first in mine})
        for layer in range(self.model.spec.num_layers):
            count = sum(1 for t in thresholds if t <= layer)
            if count not in by_first:
                active = [(row, slot) for row, slot, first in mine if first <= layer]
                by_first[count] = TokenGroup.build([r for r, _ in active], [s for _, s in active], activation_of,
                                                   self.device) if active else None
            groups.append(by_first[count])
        return BottleneckStepView(groups)

    def on_sublayer(self, name: str, x: torch.Tensor, residual: torch.Tensor, out: torch.Tensor, h: torch.Tensor,
                    meta, layer) -> None:
        group = meta.adapters[self.name].groups[layer.layer]
        stacks = self.stacks.get((layer.layer, name))
        if group is None or stacks is None:
            return
        rows = group.rows
        h[rows] = grouped_sublayer(out[rows], residual[rows], group, stacks)
