"""BitFit on the running model: per-slot bias deltas on the linears, added per token by one gather.

Per (fused) linear one table in adapters/token_vectors.py layout, [1 + S, out_features]: row 1 + s holds
b_adapter - b_base on the columns of the modules slot s's adapter retrains, 0 elsewhere. Per step and linear:
y[lo:hi] += table[index], over the span of rows holding BitFit tokens.
"""
from __future__ import annotations

import torch

from adapters.bitfit import BitFitAdapter
from adapters.config import BITFIT
from adapters.interface import AdaptableModel, AdapterRuntime, LinearSite, StepLayout, linear_sites
from adapters.token_vectors import SlotTable, VectorStepView, vector_step_view


class BitFitRuntime(AdapterRuntime):
    name = "bitfit"
    kinds = (BITFIT,)

    def __init__(self, model: AdaptableModel):
        self.model = model
        self.num_layers = model.spec.num_layers
        self.sites = linear_sites(model)                          # (layer, HF module) -> its (fused) linear
        self.tables: dict[LinearSite, SlotTable] = {}
        self.slots_in_use: set[int] = set()

    def load(self, path: str) -> BitFitAdapter:
        from adapters.bitfit import load_bitfit
        return load_bitfit(path, self.model.spec, self.model.base_bias)

    def install(self, slot: int, adapter: BitFitAdapter) -> None:
        self.slots_in_use.add(slot)
        num_slots = max(self.slots_in_use) + 1
        for (layer, name), delta in adapter.delta.items():
            linear = self.sites[(self.num_layers if layer is None else layer, name)]
            if linear not in self.tables:
                w = linear.weight
                self.tables[linear] = SlotTable(w.shape[0], 0.0, w.dtype, w.device)
            table = self.tables[linear]
            table.grow(num_slots)
            table.set(slot, linear.slices[name][0], delta)
        for table in self.tables.values():
            table.grow(num_slots)

    def remove(self, slot: int) -> None:
        self.slots_in_use.discard(slot)
        for table in self.tables.values():
            table.clear(slot)

    def step_view(self, layout: StepLayout) -> VectorStepView | None:
        return vector_step_view(layout, self.kinds, self.num_layers, self.model.embed_tokens.weight.device)

    def on_linear(self, x: torch.Tensor, y: torch.Tensor, meta, linear: LinearSite) -> None:
        table = self.tables.get(linear)
        if table is None:
            return
        rows = meta.adapters[self.name].rows[linear.layer]
        if rows is not None:
            y[rows.lo:rows.hi] += table.rows(rows.index)
