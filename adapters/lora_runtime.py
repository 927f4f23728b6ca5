"""LoRA on the running model: per-slot weight stacks on every target linear, applied with SGMV.

Each (possibly fused) `Linear` of the model gets one `LinearLora` hook. For every HF sub-module that any loaded
adapter targets (q_proj, k_proj, ... of a fused qkv_proj) it keeps stacks in the kernels' layout:
    a[name]: [S, R, in]      slot s = one adapter's lora_A (rank padded with zero rows up to R)
    b[name]: [S, width, R]   its lora_B with every constant scaling folded in (zero-padded columns)
    g[name]: [S, width]      DoRA's per-column factor (1 for plain LoRA slots)
Stacks grow (re-allocated, old slots copied) when a slot or rank beyond the current size arrives.
Tokens whose request has no LoRA adapter are in no segment and cost nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import kernels
from kernels import SegmentMeta
from server.model.llama import Linear, LlamaModel
from server.step_layout import StepLayout


class LinearLora:
    def __init__(self, linear: Linear):
        self.linear = linear
        self.a: dict[str, torch.Tensor] = {}
        self.b: dict[str, torch.Tensor] = {}
        self.g: dict[str, torch.Tensor] = {}
        self.dora_slots: set[int] = set()
        self.num_slots = 0       # every stack of this linear has this many slots

    @property
    def is_empty(self) -> bool:
        return not self.a

    def set_slot(self, slot: int, modules: dict) -> None:
        """Install adapter `modules` ({hf_name: LoraModule}) into `slot`, clearing whatever was there."""
        self.clear_slot(slot)
        w = self.linear.weight
        self.num_slots = max(self.num_slots, slot + 1)
        for name in self.a:                                 # segments may name any installed slot
            self._ensure(name, self.num_slots, 0, self.linear.slices[name][1])
        for name, mod in modules.items():
            _, width = self.linear.slices[name]
            rank = mod.lora_a.shape[0]
            self._ensure(name, self.num_slots, rank, width)
            self.a[name][slot, :rank] = mod.lora_a.to(w.dtype)
            self.b[name][slot, :, :rank] = mod.lora_b.to(w.dtype)
            if mod.dora_scale is not None:
                self.g[name][slot] = mod.dora_scale.to(w.dtype)
                self.dora_slots.add(slot)

    def clear_slot(self, slot: int) -> None:
        for name in self.a:
            if slot < self.a[name].shape[0]:
                self.a[name][slot].zero_()
                self.b[name][slot].zero_()
                self.g[name][slot].fill_(1)
        self.dora_slots.discard(slot)

    def _ensure(self, name: str, num_slots: int, rank: int, width: int) -> None:
        w = self.linear.weight
        old_a = self.a.get(name)
        s0, r0 = (old_a.shape[0], old_a.shape[1]) if old_a is not None else (0, 0)
        if num_slots <= s0 and rank <= r0:
            return
        s, r = max(num_slots, s0), max(rank, r0)
        a = w.new_zeros(s, r, w.shape[1])
        b = w.new_zeros(s, width, r)
        g = w.new_ones(s, width)
        if old_a is not None:
            a[:s0, :r0] = old_a
            b[:s0, :, :r0] = self.b[name]
            g[:s0] = self.g[name]
        self.a[name], self.b[name], self.g[name] = a, b, g

    def __call__(self, x: torch.Tensor, y: torch.Tensor, meta, linear: Linear) -> None:
        view = meta.adapters.get("lora")
        if view is None or self.is_empty:
            return
        seg = view.segments[linear.layer]
        if seg is None:
            return
        for name, a in self.a.items():
            col, width = linear.slices[name]
            if self.dora_slots:
                self._dora_rescale(y, seg, name, col, width)
            kernels.sgmv_expand(kernels.sgmv_shrink(x, a, seg), self.b[name], seg, y, col)

    def _dora_rescale(self, y: torch.Tensor, seg: SegmentMeta, name: str, col: int, width: int) -> None:
        """DoRA: base output of the adapter's tokens times g per column (PEFT leaves the bias unscaled)."""
        bias = self.linear.bias
        for start, n, slot in zip(seg.start_list, seg.len_list, seg.slot_list):
            if slot in self.dora_slots and n:
                part = y[start:start + n, col:col + width]
                g = self.g[name][slot]
                if bias is None:
                    part.mul_(g)
                else:
                    b = bias[col:col + width]
                    part.sub_(b).mul_(g).add_(b)


class EmbeddingLora:
    """LoRA on embed_tokens: h[t] += lora_a[slot][input_id[t]] @ lora_b[slot].T for the adapter's tokens."""

    def __init__(self):
        self.a: dict[int, torch.Tensor] = {}       # slot -> [vocab, r]
        self.b: dict[int, torch.Tensor] = {}       # slot -> [hidden, r], scaling folded
        self.g: dict[int, torch.Tensor] = {}       # slot -> [hidden], DoRA adapters only

    def set_slot(self, slot: int, emb, dtype: torch.dtype) -> None:
        self.a[slot] = emb.lora_a.to(dtype)
        self.b[slot] = emb.lora_b.to(dtype)
        if emb.dora_scale is not None:
            self.g[slot] = emb.dora_scale.to(dtype)

    def clear_slot(self, slot: int) -> None:
        for table in (self.a, self.b, self.g):
            table.pop(slot, None)

    def __call__(self, h: torch.Tensor, meta) -> None:
        view = meta.adapters.get("lora")
        if view is None or not self.a or view.embed_segments is None:
            return
        seg = view.embed_segments
        for start, n, slot in zip(seg.start_list, seg.len_list, seg.slot_list):
            if n and slot in self.a:
                ids = meta.input_ids[start:start + n]
                if slot in self.g:
                    h[start:start + n] *= self.g[slot]
                h[start:start + n] += self.a[slot][ids] @ self.b[slot].T


class LoraRuntime:
    """All LoRA state of one model: one hook per linear, the embedding hook, and slot install/removal."""
    kind = "lora"

    def __init__(self, model: LlamaModel):
        self.model = model
        self.linears: dict[tuple[int, str], LinearLora] = {}     # (layer, hf module name) -> its fused hook
        self.by_linear: list[LinearLora] = []
        for module in model.modules():
            if isinstance(module, Linear):
                hook = LinearLora(module)
                module.adapter_hooks.append(hook)
                self.by_linear.append(hook)
                for name in module.slices:
                    self.linears[(module.layer, name)] = hook
        self.embedding = EmbeddingLora()
        model.embed_hooks.append(self.embedding)

    def install(self, slot: int, adapter) -> None:
        """Copy a loaded LoraAdapter's tensors into `slot` of every stack it touches."""
        grouped: dict[int, dict] = {}
        modules = dict(adapter.modules)
        if adapter.lm_head is not None:
            modules[(self.model.spec.num_layers, "lm_head")] = adapter.lm_head
        for (layer, name), mod in modules.items():
            hook = self.linears[(layer, name)]
            grouped.setdefault(id(hook), {})[name] = mod
        for hook in self.by_linear:
            hook.set_slot(slot, grouped.get(id(hook), {}))
        self.embedding.clear_slot(slot)
        if adapter.embed is not None:
            self.embedding.set_slot(slot, adapter.embed, self.model.embed_tokens.weight.dtype)

    def remove(self, slot: int) -> None:
        for hook in self.by_linear:
            hook.clear_slot(slot)
        self.embedding.clear_slot(slot)

    def step_view(self, layout: StepLayout) -> "LoraStepView | None":
        """Segments of this step's LoRA tokens for every layer, the lm_head rows and the embedding.

        AdapterDrop: a request with first adapter layer k is left out of the segments of layers < k and of
        the embedding (below layer 0); the lm_head (above every layer) keeps it.
        """
        token_slots: list[int | None] = []
        token_first: list[int] = []
        sample_slots: list[int | None] = []
        for item in layout.items:
            adapter = item.seq.adapter
            slot = adapter.slot if adapter is not None and adapter.kind == self.kind else None
            token_slots.extend([slot] * item.num_tokens)
            token_first.extend([item.seq.first_adapter_layer] * item.num_tokens)
            if item.is_last_chunk:
                sample_slots.append(slot)
        if all(s is None for s in token_slots):
            return None
        device = self.model.embed_tokens.weight.device
        thresholds = sorted({f for s, f in zip(token_slots, token_first) if s is not None})
        by_count: dict[int, SegmentMeta | None] = {}
        segments: list[SegmentMeta | None] = []
        for layer in range(self.model.spec.num_layers):
            count = sum(1 for t in thresholds if t <= layer)
            if count not in by_count:
                active = [s if f <= layer else None for s, f in zip(token_slots, token_first)]
                by_count[count] = SegmentMeta.from_token_slots(active, device) if count else None
            segments.append(by_count[count])
        has_sampled = any(s is not None for s in sample_slots)
        segments.append(SegmentMeta.from_token_slots(sample_slots, device) if has_sampled else None)
        return LoraStepView(segments, segments[0] if self.embedding.a else None)


@dataclass
class LoraStepView:
    segments: list[SegmentMeta | None]     # per decoder layer, then [num_layers] = lm_head rows (sampled tokens)
    embed_segments: SegmentMeta | None     # tokens whose embedding gets the LoRA delta (not dropped)
