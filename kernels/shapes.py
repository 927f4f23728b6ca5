"""Argument checks shared by every SGMV backend (wrong shapes fail loudly with the offending sizes), and the rank
classes adapter stacks are bucketed by."""
from __future__ import annotations

import torch

from kernels.segments import SegmentMeta

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MIN_RANK_CLASS = 16     # Triton pads a rank to a power of two >= 16 anyway (tl.dot block dims)


def rank_class(rank: int) -> int:
    """The stack width an adapter of `rank` is stored at (adapters keep one stack per class, so one wide adapter
    does not widen its neighbours' SGMV calls): 5 -> 16, 64 -> 64, 65 -> 128, 300 -> 512."""
    return max(MIN_RANK_CLASS, 1 << (rank - 1).bit_length())


def check_shrink(x: torch.Tensor, lora_a: torch.Tensor, seg: SegmentMeta) -> tuple[int, int, int]:
    """x [T, H_in], lora_a [S, R, H_in] → (T, H_in, R)."""
    if x.dim() != 2 or lora_a.dim() != 3 or lora_a.shape[2] != x.shape[1]:
        raise ValueError(f"sgmv_shrink: want x [T, H_in] and lora_a [S, R, H_in], got x {tuple(x.shape)} "
                         f"lora_a {tuple(lora_a.shape)}")
    _check_common("sgmv_shrink", x, lora_a, seg)
    return x.shape[0], x.shape[1], lora_a.shape[1]


def check_expand(y: torch.Tensor, lora_b: torch.Tensor, seg: SegmentMeta, out: torch.Tensor,
                 col_offset: int) -> tuple[int, int, int]:
    """y [T, R], lora_b [S, H_out, R], out [T, >= col_offset + H_out] → (T, R, H_out)."""
    if (y.dim() != 2 or lora_b.dim() != 3 or out.dim() != 2 or lora_b.shape[2] != y.shape[1]
            or out.shape[0] != y.shape[0]):
        raise ValueError(f"sgmv_expand: want y [T, R], lora_b [S, H_out, R], out [T, H], got y {tuple(y.shape)} "
                         f"lora_b {tuple(lora_b.shape)} out {tuple(out.shape)}")
    h_out = lora_b.shape[1]
    if col_offset < 0 or col_offset + h_out > out.shape[1]:
        raise ValueError(f"sgmv_expand: columns [{col_offset}, {col_offset + h_out}) do not fit "
                         f"out {tuple(out.shape)}")
    if out.dtype != y.dtype or out.device != y.device:
        raise ValueError(f"sgmv_expand: out is {out.dtype} on {out.device}, y is {y.dtype} on {y.device}")
    _check_common("sgmv_expand", y, lora_b, seg)
    return y.shape[0], y.shape[1], h_out


def _check_common(op: str, x: torch.Tensor, w: torch.Tensor, seg: SegmentMeta) -> None:
    if x.shape[0] != seg.num_tokens:
        raise ValueError(f"{op}: {x.shape[0]} token rows but segments are for num_tokens={seg.num_tokens}")
    if x.dtype != w.dtype or x.dtype not in DTYPES:
        raise ValueError(f"{op}: no kernel for dtype={x.dtype} with weights {w.dtype} "
                         f"(want one of {[str(d) for d in DTYPES]} for both)")
    if x.device != w.device:
        raise ValueError(f"{op}: tokens on {x.device}, weights on {w.device}")
    if seg.max_slot is not None and seg.max_slot >= w.shape[0]:
        raise ValueError(f"{op}: segment slot {seg.max_slot} out of range for {w.shape[0]} stacked slots")
