"""LoRA on the running model: per-slot weight stacks on every target linear, applied with SGMV.

Each (possibly fused) linear of the model gets one `LinearLora`. The adapters that target any of its HF
sub-modules (q_proj, k_proj, ... of a fused qkv_proj) sit in the rank bucket of their rank class there
(kernels.shapes.rank_class of their widest slice: a power of two >= 16), at a local index i of that bucket; each
bucket keeps stacks in the kernels' layout:
    a:       [S_w, R_q + R_k + ..., in]  index i = one adapter's lora_A blocks, one per slice (zero-padded ranks)
    b[name]: [S_w, width, R_name]        its lora_B with every constant scaling folded in (zero-padded columns)
    g[name]: [S_w, width]                DoRA's per-column factor (1 for plain LoRA slots)
so an r 8 adapter beside an r 64 one still costs r 8 (its class, 16). Stacks grow (re-allocated, old rows copied)
when an index or rank beyond the current size arrives; an emptied bucket is freed. A step's segments (by slot, the
same for all linears of a layer) are re-cut per bucket: its adapters' segments only, slots mapped to local indices,
over the same rows (memoised in the segments' `derived` per bucket layout), so each bucket's shrink / expand
touches its own adapters' rows only. Tokens whose request has no LoRA adapter here are in no segment and cost nothing.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

import kernels
from adapters.config import LORA
from adapters.interface import AdaptableModel, AdapterRuntime, LinearSite, StepLayout
from kernels import SegmentMeta, decode_layers, lora_fused
from kernels.shapes import rank_class


class _RankStacks:
    """The LoRA stacks of one rank bucket of one (possibly fused) Linear, indexed by local index. All its targeted
    slices share one A stack, so a fused qkv_proj needs one shrink for q, k and v together:
    a[:, offset[name]:offset[name] + rank[name]] is the slice's lora_A block; its expand reads that block of the
    shrink output."""

    def __init__(self, linear: LinearSite):
        self.linear = linear
        self.ranks: dict[str, int] = {}              # targeted slice -> rank block width, in the Linear's order
        self.a: torch.Tensor | None = None           # [S, sum(ranks), in]
        self.b: dict[str, torch.Tensor] = {}         # [S, width, rank]
        self.g: dict[str, torch.Tensor] = {}         # [S, width]
        self.dora_slots: set[int] = set()
        self.num_slots = 0                           # slots every stack holds
        self._parts = None     # (a, [(slice, rank cols start, end, (col, width))], lora_fused.Slices) for `a`

    def offsets(self) -> dict[str, int]:
        out, at = {}, 0
        for name, rank in self.ranks.items():
            out[name] = at
            at += rank
        return out

    def set_slot(self, slot: int, modules: dict, num_slots: int) -> None:
        """Install adapter `modules` ({hf_name: LoraModule}) into local index `slot`, clearing whatever was there;
        `num_slots` (> slot): the indices every stack of this bucket must cover."""
        assert num_slots > slot, (num_slots, slot)
        self.clear_slot(slot)
        self._grow(num_slots, {name: mod.lora_a.shape[0] for name, mod in modules.items()})
        if self.a is None:
            return
        dtype, offsets = self.linear.weight.dtype, self.offsets()
        for name, mod in modules.items():
            rank, off = mod.lora_a.shape[0], offsets[name]
            self.a[slot, off:off + rank] = mod.lora_a.to(dtype)
            self.b[name][slot, :, :rank] = mod.lora_b.to(dtype)
            if mod.dora_scale is not None:
                self.g[name][slot] = mod.dora_scale.to(dtype)
                self.dora_slots.add(slot)

    def clear_slot(self, slot: int) -> None:
        if self.a is not None and slot < self.num_slots:
            self.a[slot].zero_()
            for name in self.ranks:
                self.b[name][slot].zero_()
                self.g[name][slot].fill_(1)
        self.dora_slots.discard(slot)

    def _grow(self, num_slots: int, ranks: dict[str, int]) -> None:
        """Re-allocate the stacks if `num_slots` or a slice's rank exceeds them (old contents copied)."""
        new_ranks = {name: max(self.ranks.get(name, 0), ranks.get(name, 0)) for name in self.linear.slices
                     if name in self.ranks or name in ranks}
        num_slots = max(num_slots, self.num_slots)
        if not new_ranks or (num_slots == self.num_slots and new_ranks == self.ranks):
            return
        w = self.linear.weight
        a = w.new_zeros(num_slots, sum(new_ranks.values()), w.shape[1])
        old_offsets, s0 = self.offsets(), self.num_slots
        at = 0
        for name, rank in new_ranks.items():
            width = self.linear.slices[name][1]
            b, g = _b_stack(w, num_slots, width, rank), w.new_ones(num_slots, width)
            if name in self.ranks:
                r0, off = self.ranks[name], old_offsets[name]
                a[:s0, at:at + r0] = self.a[:, off:off + r0]
                b[:s0, :, :r0] = self.b[name]
                g[:s0] = self.g[name]
            self.b[name], self.g[name] = b, g
            at += rank
        self.a, self.ranks, self.num_slots = a, new_ranks, num_slots

    def _parts_of(self, linear: LinearSite):
        parts = self._parts
        if parts is None or parts[0] is not self.a:               # (re)built after the stacks grew
            parts = self._parts = (self.a, [(name, off, off + self.ranks[name], linear.slices[name])
                                            for name, off in self.offsets().items()], self._fused_slices())
        return parts

    def native_op(self, seg: SegmentMeta, linear: LinearSite) -> tuple[int, ...] | None:
        """This bucket's deltas for `seg` as one kernels/decode_layers LoRA op (its OP_* order), or None where that
        kernel cannot apply them (DoRA, a GPU stack, more slices or segments than it takes)."""
        fused = self._parts_of(linear)[2]
        if (fused is None or self._has_dora(seg) or fused.dtype != self.a.dtype
                or len(fused.b_t) > decode_layers.MAX_PARTS
                or len(seg.start_list) > decode_layers.MAX_ROWS):
            return None
        count, starts, lens, slots = lora_fused.segment_arrays(seg)
        return (self.a.data_ptr(), self.a.shape[1], fused.table.data_ptr(), len(fused.b_t), count, starts, lens, slots)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, seg: SegmentMeta, linear: LinearSite) -> None:
        """y[:, slices] += the LoRA deltas of the tokens in `seg` (segments by local index)."""
        parts = self._parts_of(linear)
        fused = parts[2]
        if fused is not None and not self._has_dora(seg) and lora_fused.supports(x, self.a, fused, y):
            lora_fused.lora_fused(x, self.a, fused, lora_fused.blocked(seg), y)  # shrink + every expand, one call
            return
        shrunk = kernels.sgmv_shrink(x, self.a, seg)              # [T, sum(ranks)]
        dora = self._has_dora(seg)
        for name, start, end, (col, width) in parts[1]:
            if dora:
                self._dora_rescale(y, seg, name, col, width)
            kernels.sgmv_expand(shrunk[:, start:end], self.b[name], seg, y, col)

    def _has_dora(self, seg: SegmentMeta) -> bool:
        """Whether a DoRA adapter has tokens in `seg` (one merely installed in this bucket does not count: its
        plain-LoRA neighbours keep the fused paths)."""
        return bool(self.dora_slots) and any(n and slot in self.dora_slots
                                             for n, slot in zip(seg.len_list, seg.slot_list))

    def _fused_slices(self) -> lora_fused.Slices | None:
        """The slices for kernels/lora_fused (CPU stacks only: their B^T is contiguous)."""
        if self.a.device.type != "cpu":
            return None
        offsets = self.offsets()
        return lora_fused.slices([(self.b[name].transpose(1, 2), offsets[name], offsets[name] + rank,
                                   self.linear.slices[name][0]) for name, rank in self.ranks.items()])

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


def _b_stack(w: torch.Tensor, num_slots: int, width: int, rank: int) -> torch.Tensor:
    """A zero [S, width, rank] B stack. On CPU it is the transposed view of a [S, rank, width] tensor, so the
    expand's matmul reads each adapter's B^T row by row and a step's consecutive slots are one contiguous block
    (bench/sgmv.py, B [S, H_out, R] contiguous vs this: at 64 one-token segments into H_out 1024 the LoRA
    overhead falls from 153% to 126% of the base matmul). The Triton kernels want unit last stride, so CUDA keeps
    [S, width, rank] contiguous."""
    if w.device.type == "cuda":
        return w.new_zeros(num_slots, width, rank)
    return w.new_zeros(num_slots, rank, width).transpose(1, 2)


class _Layout(tuple):
    """Sorted (slot, (rank class, local index)) items of a LinearLora, hashed once: the key it looks its re-cut
    segments up by, once per linear per step."""

    def __new__(cls, items=()):
        layout = super().__new__(cls, items)
        layout.hash = tuple.__hash__(layout)
        return layout

    def __hash__(self) -> int:
        return self.hash


class LinearLora:
    """The LoRA of one (possibly fused) Linear: its adapters' stacks, one `_RankStacks` per rank class present."""

    def __init__(self, linear: LinearSite):
        self.linear = linear
        self.buckets: dict[int, _RankStacks] = {}                 # rank class -> its stacks
        self.place: dict[int, tuple[int, int]] = {}               # slot -> (rank class, local index)
        self.layout = _Layout()                                   # the memo key of a step's re-cut segments
        self.stamp = next(_STAMPS)        # new on every install / removal: the memo key of this linear's native ops

    def set_slot(self, slot: int, modules: dict) -> None:
        """Install adapter `modules` ({hf_name: LoraModule}, may be empty) into `slot`, clearing whatever was there."""
        self.clear_slot(slot)
        if modules:
            width = rank_class(max(mod.lora_a.shape[0] for mod in modules.values()))
            bucket = self.buckets.setdefault(width, _RankStacks(self.linear))
            used = {local for w, local in self.place.values() if w == width}
            local = min(set(range(len(used) + 1)) - used)
            bucket.set_slot(local, modules, max(local + 1, bucket.num_slots))
            self.place[slot] = (width, local)
        self.layout = _Layout(sorted(self.place.items()))
        self.stamp = next(_STAMPS)

    def clear_slot(self, slot: int) -> None:
        if slot in self.place:
            width, local = self.place.pop(slot)
            if any(w == width for w, _ in self.place.values()):
                self.buckets[width].clear_slot(local)
            else:                                             # a removed wide adapter leaves no wide stack behind
                del self.buckets[width]
        self.layout = _Layout(sorted(self.place.items()))
        self.stamp = next(_STAMPS)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, meta, linear: LinearSite) -> None:
        view = meta.adapters["lora"]
        seg = view.segments[linear.layer]
        if not self.buckets or seg is None:
            return
        for width, bucket_seg in self.bucket_segments(seg):
            self.buckets[width](x, y, bucket_seg, linear)

    def native_ops(self, view: "LoraStepView", linear: LinearSite) -> list[tuple[int, ...]] | None:
        """`__call__` as kernels/decode_layers LoRA ops (one per rank bucket with tokens), or None. Memoised in the
        segments' `derived` until an install or removal here: a decode batch that keeps its requests keeps its
        step view (LoraRuntime.step_view), so its steps reuse the ops."""
        seg = view.segments[linear.layer]
        if not self.buckets or seg is None:
            return []
        key = ("lora_native", self.stamp)
        if key not in seg.derived:
            seg.derived[key] = self._native_ops(seg, linear)
        return seg.derived[key]

    def _native_ops(self, seg: SegmentMeta, linear: LinearSite) -> list[tuple[int, ...]] | None:
        ops = []
        for width, bucket_seg in self.bucket_segments(seg):
            op = self.buckets[width].native_op(bucket_seg, linear)
            if op is None:
                return None
            ops.append(op)
        return ops

    def bucket_segments(self, seg: SegmentMeta) -> list[tuple[int, SegmentMeta]]:
        """(rank class, `seg` cut to that bucket's adapters with local indices) for each bucket with tokens in
        `seg`; memoised in seg.derived, shared by every linear whose adapters sit alike."""
        key = ("lora_buckets", self.layout)
        if key not in seg.derived:
            cut: dict[int, tuple[list, list, list]] = {}
            for start, n, slot in zip(seg.start_list, seg.len_list, seg.slot_list):
                if n and slot in self.place:
                    width, local = self.place[slot]
                    for part, v in zip(cut.setdefault(width, ([], [], [])), (start, n, local)):
                        part.append(v)
            device = seg.starts.device
            seg.derived[key] = [(w, SegmentMeta.from_segments(*cut[w], seg.num_tokens, device)) for w in sorted(cut)]
        return seg.derived[key]


_STAMPS = itertools.count()


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
        view = meta.adapters["lora"]
        if not self.a or view.embed_segments is None:
            return
        seg = view.embed_segments
        for start, n, slot in zip(seg.start_list, seg.len_list, seg.slot_list):
            if n and slot in self.a:
                ids = meta.input_ids[start:start + n]
                if slot in self.g:
                    h[start:start + n] *= self.g[slot]
                h[start:start + n] += self.a[slot][ids] @ self.b[slot].T


class LoraRuntime(AdapterRuntime):
    """All LoRA state of one model: one LinearLora per linear, the embedding LoRA, and slot install/removal."""
    name = "lora"
    kinds = (LORA,)

    def __init__(self, model: AdaptableModel):
        self.model = model
        self.linears: dict[tuple[int, str], LinearLora] = {}     # (layer, hf module name) -> its fused stacks
        self.by_linear: dict[LinearSite, LinearLora] = {}
        for linear in model.linears():
            stacks = LinearLora(linear)
            self.by_linear[linear] = stacks
            for name in linear.slices:
                self.linears[(linear.layer, name)] = stacks
        self.embedding = EmbeddingLora()
        self._last_view: tuple[tuple, LoraStepView] | None = None    # (what it was built from, the last step view)

    def load(self, path: str):
        from adapters.lora import load_lora
        return load_lora(path, self.model.spec, self.model.base_weight)

    def on_linear(self, x: torch.Tensor, y: torch.Tensor, meta, linear: LinearSite) -> None:
        self.by_linear[linear](x, y, meta, linear)

    def on_native_linear(self, meta, linear: LinearSite) -> list[tuple[int, ...]] | None:
        return self.by_linear[linear].native_ops(meta.adapters[self.name], linear)

    def on_embed(self, h: torch.Tensor, meta) -> None:
        self.embedding(h, meta)

    def install(self, slot: int, adapter) -> None:
        """Copy a loaded LoraAdapter's tensors into `slot` of every stack it touches."""
        grouped: dict[int, dict] = {}
        modules = dict(adapter.modules)
        if adapter.lm_head is not None:
            modules[(self.model.spec.num_layers, "lm_head")] = adapter.lm_head
        for (layer, name), mod in modules.items():
            hook = self.linears[(layer, name)]
            grouped.setdefault(id(hook), {})[name] = mod
        for hook in self.by_linear.values():
            hook.set_slot(slot, grouped.get(id(hook), {}))
        self.embedding.clear_slot(slot)
        if adapter.embed is not None:
            self.embedding.set_slot(slot, adapter.embed, self.model.embed_tokens.weight.dtype)

    def remove(self, slot: int) -> None:
        for hook in self.by_linear.values():
            hook.clear_slot(slot)
        self.embedding.clear_slot(slot)

    def step_view(self, layout: StepLayout) -> "LoraStepView | None":
        """Segments of this step's LoRA tokens for every layer, the lm_head rows and the embedding.

        AdapterDrop: a request with first adapter layer k is left out of the segments of layers < k and of
        the embedding (below layer 0); the lm_head (above every layer) keeps it.
        """
        token_slots, token_first, sample_slots = layout.slots_of(self.kinds)
        if all(s is None for s in token_slots):
            return None
        device = self.model.embed_tokens.weight.device
        # a request with more rows than a decode (a prefill chunk) is a segment of its own, so the decode rows of its
        # adapter stay one short segment: the C kernel's cut into blocks (lora_fused.blocked) leaves them whole
        runs = [i if item.num_tokens > lora_fused.MAX_LEN else -1
                for i, item in enumerate(layout.items) for _ in range(item.num_tokens)]
        key = (tuple(token_slots), tuple(token_first), tuple(sample_slots), tuple(runs), bool(self.embedding.a))
        if self._last_view is not None and self._last_view[0] == key:
            return self._last_view[1]           # e.g. decode steps of the same batch: their memos come along
        thresholds = sorted({f for s, f in zip(token_slots, token_first) if s is not None})
        by_count: dict[int, SegmentMeta | None] = {}
        segments: list[SegmentMeta | None] = []
        for layer in range(self.model.spec.num_layers):
            count = sum(1 for t in thresholds if t <= layer)
            if count not in by_count:
                active = [s if f <= layer else None for s, f in zip(token_slots, token_first)]
                by_count[count] = SegmentMeta.from_token_slots(active, device, runs) if count else None
            segments.append(by_count[count])
        has_sampled = any(s is not None for s in sample_slots)
        segments.append(SegmentMeta.from_token_slots(sample_slots, device) if has_sampled else None)
        view = LoraStepView(segments, segments[0] if self.embedding.a else None)
        self._last_view = (key, view)
        return view


@dataclass
class LoraStepView:
    segments: list[SegmentMeta | None]     # per decoder layer, then [num_layers] = lm_head rows (sampled tokens)
    embed_segments: SegmentMeta | None     # tokens whose embedding gets the LoRA delta (not dropped)
