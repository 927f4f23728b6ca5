"""(IA)^3 on the running model: per-slot scale vectors on the linears, applied per token by one gather.

Per (fused) linear, tables in adapters/token_vectors.py layout:
    out          [1 + S, out_features]  output scales (1 on columns of modules the slot does not scale)
    inp          [1 + S, in_features]   input scales, for a linear of one HF module (down_proj, o_proj, lm_head)
    inp_slices   name -> [1 + S, in]    input scales of one slice of a fused linear (a feedforward module among
                                        q/k/v or gate/up): that slice's columns are recomputed from the scaled input
PEFT's math: a feedforward module computes (x * l) @ W.T + b, any other (x @ W.T + b) * l. AdapterHub's
IA3Config (kind adapterhub_ia3, adapters/adapterhub_ia3.py) has output scales only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from adapters.adapterhub_ia3 import IA3Adapter
from adapters.config import ADAPTERHUB_IA3, IA3, detect_kind
from adapters.interface import AdaptableModel, AdapterRuntime, LinearSite, StepLayout, linear_sites
from adapters.token_vectors import SlotTable, VectorStepView, vector_step_view


class LinearIA3:
    def __init__(self, linear: LinearSite):
        self.linear = linear
        self.out: SlotTable | None = None
        self.inp: SlotTable | None = None
        self.inp_slices: dict[str, SlotTable] = {}

    def tables(self) -> list[SlotTable]:
        return [t for t in (self.out, self.inp, *self.inp_slices.values()) if t is not None]

    def output_table(self) -> SlotTable:
        if self.out is None:
            w = self.linear.weight
            self.out = SlotTable(w.shape[0], 1.0, w.dtype, w.device)
        return self.out

    def input_table(self, name: str) -> SlotTable:
        w = self.linear.weight
        if len(self.linear.slices) == 1:
            if self.inp is None:
                self.inp = SlotTable(w.shape[1], 1.0, w.dtype, w.device)
            return self.inp
        if name not in self.inp_slices:
            self.inp_slices[name] = SlotTable(w.shape[1], 1.0, w.dtype, w.device)
        return self.inp_slices[name]


class IA3Runtime(AdapterRuntime):
    name = "ia3"
    kinds = (IA3, ADAPTERHUB_IA3)

    def __init__(self, model: AdaptableModel):
        self.model = model
        self.num_layers = model.spec.num_layers
        self.sites = linear_sites(model)                          # (layer, HF module) -> its (fused) linear
        self.by_linear: dict[LinearSite, LinearIA3] = {}
        self.slots_in_use: set[int] = set()

    def load(self, path: str) -> IA3Adapter:
        if detect_kind(path) == ADAPTERHUB_IA3:
            from adapters.adapterhub_ia3 import load_adapterhub_ia3
            widths = {name: linear.slices[name][1] for (layer, name), linear in self.sites.items() if layer == 0}
            return load_adapterhub_ia3(path, widths, self.num_layers)
        from adapters.ia3 import load_ia3
        return load_ia3(path, self.model.spec, self.model.base_weight)

    def install(self, slot: int, adapter: IA3Adapter) -> None:
        self.slots_in_use.add(slot)
        num_slots = max(self.slots_in_use) + 1
        for table_of, vectors in ((lambda st, name: st.output_table(), adapter.output),
                                  (lambda st, name: st.input_table(name), adapter.input)):
            for (layer, name), vector in vectors.items():
                linear = self.sites[(self.num_layers if layer is None else layer, name)]
                state = self.by_linear.setdefault(linear, LinearIA3(linear))
                table = table_of(state, name)
                table.grow(num_slots)
                table.set(slot, linear.slices[name][0] if table is state.out else 0, vector)
        for state in self.by_linear.values():
            for table in state.tables():
                table.grow(num_slots)

    def remove(self, slot: int) -> None:
        self.slots_in_use.discard(slot)
        for state in self.by_linear.values():
            for table in state.tables():
                table.clear(slot)

    def step_view(self, layout: StepLayout) -> VectorStepView | None:
        return vector_step_view(layout, self.kinds, self.num_layers, self.model.embed_tokens.weight.device)

    def on_linear_input(self, x: torch.Tensor, meta, linear: LinearSite) -> torch.Tensor:
        state = self.by_linear.get(linear)
        if state is None or state.inp is None:
            return x
        rows = meta.adapters[self.name].rows[linear.layer]
        if rows is None:
            return x
        scale = state.inp.rows(rows.index)
        if rows.lo == 0 and rows.hi == x.shape[0]:
            return x * scale
        x = x.clone()
        x[rows.lo:rows.hi] *= scale
        return x

    def on_linear(self, x: torch.Tensor, y: torch.Tensor, meta, linear: LinearSite) -> None:
        state = self.by_linear.get(linear)
        if state is None:
            return
        rows = meta.adapters[self.name].rows[linear.layer]
        if rows is None:
            return
        lo, hi = rows.lo, rows.hi
        for name, table in state.inp_slices.items():
            col, width = linear.slices[name]
            bias = None if linear.bias is None else linear.bias[col:col + width]
            y[lo:hi, col:col + width] = F.linear(x[lo:hi] * table.rows(rows.index),
                                                 linear.weight[col:col + width], bias)
        if state.out is not None:
            y[lo:hi] *= state.out.rows(rows.index)
