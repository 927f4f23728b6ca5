"""One LoRA linear's delta in one CPU call (kernels/lora_fused.c): the shrink by the stacked A of all the
linear's slices and every slice's expand, for every segment of the step.

The torch path costs one shrink plus one expand per slice (4 + 7 ops a layer for all-linear LoRA on a fused
Llama), each a small GEMM call whose fixed cost dominates at decode sizes on a deep, narrow model
(bench/sgmv.py). `lora_fused_ref` is the torch reference: kernels/reference.py's shrink + expands.

Built and loaded by kernels/native.py; `available()` is False where it cannot be built, and callers use their
torch path.
"""
from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import torch

from kernels import native, reference
from kernels.segments import SegmentMeta

DTYPES = {torch.float32: "lora_fused_f32", torch.bfloat16: "lora_fused_bf16"}
MAX_LEN = 16    # segments up to this long are decodes (adapters/lora_runtime.py keeps a prefill chunk apart from them)
BLOCK = 64      # longer segments are cut into pieces of this many rows (`blocked`)


@dataclass(frozen=True)
class Slices:
    """A linear's LoRA slices in the kernel's form, built once per stack layout (`slices`).

    b_t[p]: [S, r1 - r0, width] contiguous B^T stack of slice p; rows r0[p]:r1[p] of the A stack are its shrink
    rows; it adds into columns col[p]:col[p] + width."""
    b_t: tuple[torch.Tensor, ...]
    table: torch.Tensor            # [5, P] int64: r0, r1, col, width, address of b_t
    rows: tuple[int, ...]          # the address of each row of `table`, for the call
    dtype: torch.dtype | None      # every b_t's dtype when they are all contiguous and agree, else None


def slices(parts: list[tuple[torch.Tensor, int, int, int]]) -> Slices:
    """parts: (b_t [S, R_p, W_p], r0, r1, col) per slice."""
    b_t = tuple(b for b, *_ in parts)
    table = torch.tensor([[r0 for _, r0, _, _ in parts], [r1 for _, _, r1, _ in parts],
                          [col for *_, col in parts], [b.shape[2] for b in b_t], [b.data_ptr() for b in b_t]],
                         dtype=torch.long)
    dtypes = {b.dtype for b in b_t}
    ok = len(dtypes) == 1 and all(b.is_contiguous() for b in b_t) and len({b.shape[0] for b in b_t}) == 1
    return Slices(b_t, table, tuple(row.data_ptr() for row in table), dtypes.pop() if ok else None)


def lora_fused_ref(x: torch.Tensor, a: torch.Tensor, sl: Slices, seg: SegmentMeta, y: torch.Tensor) -> torch.Tensor:
    """y[rows of segment i, col_p:col_p + W_p] += (x[rows] @ a[slot_i].T)[:, r0_p:r1_p] @ b_t[p][slot_i], in
    place; x [T, H_in], a [S, R, H_in], y [T, *]. Returns y."""
    shrunk = reference.sgmv_shrink(x, a, seg)
    for b, (r0, r1, col) in zip(sl.b_t, sl.table[:3].T.tolist()):
        reference.sgmv_expand(shrunk[:, r0:r1], b.transpose(1, 2), seg, y, col)
    return y


def lora_fused(x: torch.Tensor, a: torch.Tensor, sl: Slices, seg: SegmentMeta, y: torch.Tensor) -> torch.Tensor:
    """`lora_fused_ref` by the C kernel. Needs `supports(...)`."""
    num_segments, starts, lens, slots = segment_arrays(seg)
    getattr(_library(), DTYPES[x.dtype])(
        x.data_ptr(), x.stride(0), x.shape[1], a.data_ptr(), a.shape[1], y.data_ptr(), y.stride(0), num_segments,
        starts, lens, slots, len(sl.b_t), *sl.rows, torch.get_num_threads())
    return y


def supports(x: torch.Tensor, a: torch.Tensor, sl: Slices, y: torch.Tensor) -> bool:
    return (x.dtype in DTYPES and a.dtype == x.dtype == y.dtype == sl.dtype and x.device.type == "cpu"
            and x.dim() == 2 and y.dim() == 2 and x.stride(1) == 1 and y.stride(1) == 1 and a.is_contiguous()
            and a.shape[2] == x.shape[1] and a.shape[0] == sl.b_t[0].shape[0] and available())


def blocked(seg: SegmentMeta) -> SegmentMeta:
    """`seg` with every segment longer than BLOCK rows cut into BLOCK-row pieces of the same slot (memoised in
    seg.derived). A piece's x rows stay in L2 while the kernel dots them with each block of A rows, and a long
    prefill chunk becomes many work items for the threads: bench/lora_prefill.py measures the kernel so cut
    against the torch path's per-segment GEMMs."""
    found = seg.derived.get("lora_blocked")
    if found is None:
        if seg.max_len <= BLOCK:
            found = seg
        else:
            cut = ([], [], [])
            for start, n, slot in zip(seg.start_list, seg.len_list, seg.slot_list):
                for at in range(0, n, BLOCK):
                    for part, v in zip(cut, (start + at, min(BLOCK, n - at), slot)):
                        part.append(v)
            found = SegmentMeta.from_segments(*cut, seg.num_tokens, seg.starts.device)
        seg.derived["lora_blocked"] = found
    return found


def available() -> bool:
    return _library() is not None


def segment_arrays(seg: SegmentMeta) -> tuple[int, int, int, int]:
    """(count, addresses of the int64 starts, lens, slots), built once per SegmentMeta (every layer of the step
    reuses them; the arrays are kept alive in its `derived`)."""
    found = seg.derived.get("native_segments")
    if found is None:
        arrays = [torch.tensor(v, dtype=torch.long) for v in (seg.start_list, seg.len_list, seg.slot_list)]
        found = seg.derived["native_segments"] = (len(seg.start_list), *(t.data_ptr() for t in arrays), arrays)
    return found[:4]


@functools.cache
def _library() -> ctypes.CDLL | None:
    p, i, l = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
    return native.load_functions("lora_fused", DTYPES.values(), [p, l, i, p, i, p, l, i, p, p, p, i, p, p, p, p, p, i])
