"""AdapterHub LoRA on the running model (kinds adapterhub_lora, adapterhub_lora_gated): LoRA's per-slot stacks
(rank buckets) and SGMV (adapters/lora_runtime.py), with AdapterHub's optional gate between shrink and expand:

    y += ((x @ A.T) * g) @ B.T      g: the request's gate for this (layer, module), [T, 1] per row (1 ungated)

g is taken over the prompt at the request's first prefill and kept for its decoding (adapters/gates.py): the
prompt's logits equal AdapterHub's; generated tokens use the prompt's gate (AdapterHub re-averages over the whole
grown sequence at every token, which no KV-cached server can match).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import kernels
from adapters.adapterhub_lora import (AdapterHubLora, Gate, adapterhub_lora_from, load_adapterhub_lora,
                                      take_lora_tensors)
from adapters.config import ADAPTERHUB_LORA, ADAPTERHUB_LORA_GATED
from adapters.gates import GatedRequest, gate_rows, gated_requests
from adapters.interface import AdaptableModel, LinearSite, StepLayout
from adapters.lora_runtime import LoraRuntime, LoraStepView


@dataclass
class GatedLoraStepView(LoraStepView):
    gated: list[GatedRequest] | None = None       # this step's requests of gated adapters


class AdapterHubLoraRuntime(LoraRuntime):
    name = "adapterhub_lora"
    kinds = (ADAPTERHUB_LORA, ADAPTERHUB_LORA_GATED)
    whole_prompt_kinds = (ADAPTERHUB_LORA_GATED,)
    on_embed = None                                 # AdapterHub LoRA has no embedding LoRA

    def __init__(self, model: AdaptableModel):
        super().__init__(model)
        self.gates: dict[int, dict[tuple[int, str], Gate]] = {}     # slot -> (layer, module) -> its gate

    def load(self, path: str) -> AdapterHubLora:
        return load_adapterhub_lora(path, self.model.spec.num_layers, self.model.base_weight)

    def load_part(self, path: str, config: dict, tensors: dict[str, torch.Tensor], source: str) -> AdapterHubLora:
        """The LoRA part of a union adapter (UniPELT)."""
        return adapterhub_lora_from(config, take_lora_tensors(tensors), path, self.model.spec.num_layers,
                                    self.model.base_weight, source, path)

    def install(self, slot: int, adapter: AdapterHubLora) -> None:
        super().install(slot, adapter)
        self.gates.pop(slot, None)
        if adapter.gates:
            dtype = self.model.embed_tokens.weight.dtype
            self.gates[slot] = {key: Gate(g.weight.to(dtype), g.bias.to(dtype)) for key, g in adapter.gates.items()}

    def remove(self, slot: int) -> None:
        super().remove(slot)
        self.gates.pop(slot, None)

    def step_view(self, layout: StepLayout) -> GatedLoraStepView | None:
        view = super().step_view(layout)
        if view is None:
            return None
        gated = gated_requests(layout, self.name, set(self.gates)) if self.gates else []
        return GatedLoraStepView(view.segments, view.embed_segments, gated or None)

    # gated deltas (per-token gates on each module's output) have no form among the decode stack's LoRA ops: its
    # steps keep the module path
    on_native_linear = None

    def on_linear(self, x: torch.Tensor, y: torch.Tensor, meta, linear: LinearSite) -> None:
        view = meta.adapters[self.name]
        lora = self.by_linear[linear]
        seg = view.segments[linear.layer]
        if not lora.buckets or seg is None:
            return
        gates: dict[str, torch.Tensor | None] = {}         # module -> [T, 1] per row, or None (none gated)
        for width, bucket_seg in lora.bucket_segments(seg):
            stacks = lora.buckets[width]
            shrunk = kernels.sgmv_shrink(x, stacks.a, bucket_seg)              # [T, sum(ranks)]
            for name, off in stacks.offsets().items():
                part = shrunk[:, off:off + stacks.ranks[name]]
                if view.gated and name not in gates:
                    key = (linear.layer, name)
                    gates[name] = gate_rows(x, view.gated, linear.layer, key, lambda slot: self._gate(slot, key))
                if gates.get(name) is not None:
                    part = part * gates[name]
                kernels.sgmv_expand(part.contiguous(), stacks.b[name], bucket_seg, y, linear.slices[name][0])

    def _gate(self, slot: int, key: tuple[int, str]) -> tuple[torch.Tensor, torch.Tensor] | None:
        gate = self.gates.get(slot, {}).get(key)
        return None if gate is None else (gate.weight, gate.bias)
