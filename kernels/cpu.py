"""SGMV on CPU with torch: the fast path (bench/sgmv.py measures it against the base matmul).

Segments run one of two ways, picked per call from the step's segment lengths and the weight size:
- loop: one `mm` / `addmm_` per segment on views (no copies). Views come from one `split` of x / y / out per
  call (~0.6 us a view, vs ~2 us for `x[s:e]`), but each matmul call still costs a few us of dispatch, so
  this suits few or long segments (prefill) and weight slices too big to copy.
- batched: short segments (len <= SHORT_LEN) padded to their longest, their weight slices gathered with one
  `index_select` (just viewed when their slots are consecutive), one `bmm`. Wins for many short segments
  (decode: ~2x at 8 segments of 8 tokens), unless the gathered slices outgrow the cache and copying them
  costs more than the calls it saves (MAX_GATHER_BYTES; e.g. expand into H_out=5632 at 64 one-token segments).
The split of the segments is built once per step (`_plan`, memoised on the SegmentMeta) and reused by every
layer. Matmuls on bf16/fp16 tensors accumulate in fp32 inside torch's CPU GEMMs.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from kernels.segments import SegmentMeta
from kernels.shapes import check_expand, check_shrink

SHORT_LEN = 8  # segments of at most this many tokens may be batched
MIN_BATCHED = 2  # fewer short segments than this just loop
# Batch only while the gathered weight slices (num_batched x [R, H_in] or [H_out, R]) stay cache-sized: past
# that the copy streams through memory and the loop, which reads each slice once, wins (measured on a 2-core
# EPYC VM, 32 MiB L3: 64 slices of [16, 1024] fp32 = 4 MiB batch 1.8x faster; of [2816, 16] = 11 MiB loop 1.3x).
MAX_GATHER_BYTES = 8 << 20


@dataclass(frozen=True)
class _Plan:
    """Worked example: token slots [None, None, 0, 0, 0, 2, 2, None, 1] with SHORT_LEN = 2:
    sizes = [2, 3, 0, 2, 1, 1, 0] (rows.split(sizes) = gap, seg 0, gap, seg 1, gap, seg 2, gap),
    whole = None, covers_all = False, long = [(1, 0)], short = [(3, 2), (5, 1)];
    batched: pad_len = 2, slots = [2, 1], rows = [5, 6, 8, 8],
    keep = [0, 1, 2], keep_rows = [5, 6, 8], dense_start = None, slot_start = None."""
    sizes: list[int]  # row chunks covering [0, T): gaps (possibly 0 rows) and segments alternate
    whole: int | None  # the slot when one segment covers every row (one adapter for the batch): no views at all
    covers_all: bool  # no base rows: shrink need not zero its output
    long: list[tuple[int, int]]  # (chunk index, slot) of segments longer than SHORT_LEN
    short: list[tuple[int, int]]  # (chunk index, slot) of the other non-empty segments
    # The short segments batched as [num_batched, pad_len] rows; padding repeats a real row, results dropped.
    num_batched: int = 0  # 0: no batching (fewer than MIN_BATCHED short segments)
    pad_len: int = 0
    slots: torch.Tensor | None = None  # [num_batched] slot of each batched segment
    rows: torch.Tensor | None = None  # [num_batched * pad_len] token row of each padded row
    keep: torch.Tensor | None = None  # positions of real rows among the padded ones; None: no padding
    keep_rows: torch.Tensor | None = None  # token row of each real padded row
    dense_start: int | None = None  # rows == arange(dense_start, ...): use views instead of gathers
    slot_start: int | None = None  # slots == arange(slot_start, ...): the weights are a view, not a copy


def _plan(seg: SegmentMeta) -> _Plan:
    plan = seg.derived.get("cpu_plan")
    if plan is None:
        plan = seg.derived["cpu_plan"] = _build_plan(seg)
    return plan


def _build_plan(seg: SegmentMeta) -> _Plan:
    sizes, long, short, end = [], [], [], 0
    for start, n, slot in zip(seg.start_list, seg.len_list, seg.slot_list):
        if n == 0:
            continue
        sizes += [start - end, n]
        (long if n > SHORT_LEN else short).append((len(sizes) - 1, slot))
        end = start + n
    sizes.append(seg.num_tokens - end)
    segs = long + short
    whole = segs[0][1] if len(segs) == 1 and sizes[1] == seg.num_tokens else None
    covers_all = not any(sizes[0::2])
    if len(short) < MIN_BATCHED:
        return _Plan(sizes, whole, covers_all, long, short)
    starts = [0, *itertools.accumulate(sizes)]  # first row of each chunk
    pad_len = max(sizes[i] for i, _ in short)
    rows, keep = [], []
    for i, _ in short:
        keep += range(len(rows), len(rows) + sizes[i])
        rows += range(starts[i], starts[i] + sizes[i])
        rows += [starts[i]] * (pad_len - sizes[i])
    padded = len(keep) < len(rows)
    rows_t = torch.tensor(rows)
    keep_t = torch.tensor(keep) if padded else None
    slots = [slot for _, slot in short]
    return _Plan(sizes, whole, covers_all, long, short, num_batched=len(short), pad_len=pad_len,
                 slots=torch.tensor(slots), rows=rows_t, keep=keep_t,
                 keep_rows=rows_t[keep_t] if padded else rows_t,
                 dense_start=rows[0] if rows == list(range(rows[0], rows[0] + len(rows))) else None,
                 slot_start=slots[0] if slots == list(range(slots[0], slots[0] + len(slots))) else None)


def _split(plan: _Plan, weights: torch.Tensor) -> tuple[list[tuple[int, int]], bool]:
    """→ (segments to loop over, whether to batch the short ones) for this call's weight size."""
    gather_bytes = 0 if plan.slot_start is not None else \
        plan.num_batched * weights.shape[1] * weights.shape[2] * weights.element_size()
    batched = plan.num_batched > 0 and gather_bytes <= MAX_GATHER_BYTES
    return (plan.long if batched else plan.long + plan.short), batched


def _batched_weights(w: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """[num_batched, ...] weights of the batched segments: a view when their slots are consecutive (the runner
    orders requests by slot, so e.g. 64 adapters in slots 0..63 need no copy), else one index_select."""
    if plan.slot_start is not None:
        return w[plan.slot_start:plan.slot_start + plan.num_batched]
    return w.index_select(0, plan.slots)


def _slot_views(w_t: torch.Tensor, num_uses: int):
    """slot → w_t[slot]: one unbind of the stack (~0.7 us a slot) when that beats indexing (~2.4 us a use)."""
    return w_t.unbind(0) if w_t.shape[0] <= 2 * num_uses else w_t


def sgmv_shrink(x: torch.Tensor, lora_a: torch.Tensor, seg: SegmentMeta) -> torch.Tensor:
    """Semantics: y[s[i]:s[i]+n[i]] = x[s[i]:s[i]+n[i]] @ lora_a[slot[i]].T.

    x [T, H_in], lora_a [S, R, H_in] → new y [T, R] in x.dtype; rows in no segment are 0.
    """
    num_tokens, h_in, rank = check_shrink(x, lora_a, seg)
    plan = _plan(seg)
    if plan.whole is not None:
        return torch.mm(x, lora_a[plan.whole].T)
    loop, batched = _split(plan, lora_a)
    if batched and not loop and plan.covers_all and plan.dense_start == 0:  # e.g. decode: x is [n, pad_len] rows
        a_t = _batched_weights(lora_a, plan).transpose(1, 2)
        return torch.bmm(x.view(plan.num_batched, plan.pad_len, h_in), a_t).view(num_tokens, rank)
    y = (torch.empty if plan.covers_all else torch.zeros)(num_tokens, rank, dtype=x.dtype, device=x.device)
    if loop:
        xs, ys = x.split_with_sizes(plan.sizes), y.split_with_sizes(plan.sizes)
        a_t = _slot_views(lora_a.transpose(1, 2), len(loop))
        for i, slot in loop:
            torch.mm(xs[i], a_t[slot], out=ys[i])
    if batched:
        n, pad_len = plan.num_batched, plan.pad_len
        a_t = _batched_weights(lora_a, plan).transpose(1, 2)  # [n, H_in, R]
        if plan.dense_start is not None:
            rows = slice(plan.dense_start, plan.dense_start + n * pad_len)
            y[rows] = torch.bmm(x[rows].view(n, pad_len, h_in), a_t).view(n * pad_len, rank)
        else:
            yb = torch.bmm(x.index_select(0, plan.rows).view(n, pad_len, h_in), a_t).view(n * pad_len, rank)
            y.index_copy_(0, plan.keep_rows, yb if plan.keep is None else yb.index_select(0, plan.keep))
    return y


def sgmv_expand(y: torch.Tensor, lora_b: torch.Tensor, seg: SegmentMeta, out: torch.Tensor,
                col_offset: int = 0) -> torch.Tensor:
    """Semantics: out[s[i]:s[i]+n[i], c:c+H_out] += y[s[i]:s[i]+n[i]] @ lora_b[slot[i]].T.

    y [T, R], lora_b [S, H_out, R], out [T, H] with c = col_offset. Modifies `out` in place (rows in no
    segment untouched) and returns it.
    """
    _, rank, h_out = check_expand(y, lora_b, seg, out, col_offset)
    o = out if col_offset == 0 and h_out == out.shape[1] else out[:, col_offset:col_offset + h_out]
    plan = _plan(seg)
    if plan.whole is not None:
        o.addmm_(y, lora_b[plan.whole].T)
        return out
    loop, batched = _split(plan, lora_b)
    lora_b_t = lora_b.transpose(1, 2)  # [S, R, H_out]: contiguous when the stack is stored that way (lora_runtime)
    if loop:
        ys, os_ = y.split_with_sizes(plan.sizes), o.split_with_sizes(plan.sizes)
        b_t = _slot_views(lora_b_t, len(loop))
        for i, slot in loop:
            os_[i].addmm_(ys[i], b_t[slot])
    if batched:
        n, pad_len = plan.num_batched, plan.pad_len
        b_t = _batched_weights(lora_b_t, plan)  # [n, R, H_out]
        if plan.dense_start is not None:
            rows = slice(plan.dense_start, plan.dense_start + n * pad_len)
            o[rows].view(n, pad_len, h_out).baddbmm_(y[rows].view(n, pad_len, rank), b_t)
        else:
            delta = torch.bmm(y.index_select(0, plan.rows).view(n, pad_len, rank), b_t).view(n * pad_len, h_out)
            o.index_add_(0, plan.keep_rows, delta if plan.keep is None else delta.index_select(0, plan.keep))
    return out
