"""SGMV expand on CUDA (Triton): add each segment's rank-R activations times its adapter's B into `out`.

Modelled on punica's sgmv expand and vLLM's `lora_expand_op.py`: one program per (row tile, column tile)
of a segment; the whole rank (<= 128, padded to BLOCK_R) is one `tl.dot`, so no K loop and no atomics:
each output element belongs to exactly one program.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.segments import SegmentMeta
from kernels.sgmv_shrink import MAX_RANK, check_launch
from kernels.shapes import check_expand


@triton.jit
def _sgmv_expand_kernel(
        y_ptr, b_ptr, out_ptr, starts_ptr, lens_ptr, slots_ptr,
        h_out, rank, y_stride, b_stride_slot, b_stride_out, out_stride, col_offset,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, UPCAST: tl.constexpr):
    """Grid (cdiv(max_len, BLOCK_M) * cdiv(h_out, BLOCK_N), num_segments): program (m*num_n + n, i)
    does rows [m*BLOCK_M, (m+1)*BLOCK_M) of segment i, columns [n*BLOCK_N, (n+1)*BLOCK_N) of B.
    y [T, R], b [S, H_out, R], out [T, H] written at col_offset; all with unit last stride."""
    pid = tl.program_id(0)
    seg = tl.program_id(1)
    num_n = tl.cdiv(h_out, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    seg_len = tl.load(lens_ptr + seg)
    if pid_m * BLOCK_M >= seg_len:
        return
    start = tl.load(starts_ptr + seg).to(tl.int64)
    slot = tl.load(slots_ptr + seg).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < seg_len
    mask_n = offs_n < h_out
    mask_r = offs_r < rank
    rows = start + offs_m
    yt = tl.load(y_ptr + rows[:, None] * y_stride + offs_r[None, :],
                 mask=mask_m[:, None] & mask_r[None, :], other=0.0)  # [BLOCK_M, BLOCK_R]
    bt = tl.load(b_ptr + slot * b_stride_slot + offs_n[None, :] * b_stride_out + offs_r[:, None],
                 mask=mask_r[:, None] & mask_n[None, :], other=0.0)  # [BLOCK_R, BLOCK_N]
    if UPCAST:  # the interpreter's tl.dot is wrong for bf16
        yt = yt.to(tl.float32)
        bt = bt.to(tl.float32)
    acc = tl.dot(yt, bt, input_precision="tf32x3")  # fp32 inputs: 3xTF32 on tensor cores, ~fp32 accurate
    out_ptrs = out_ptr + rows[:, None] * out_stride + col_offset + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    acc += tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class ExpandConfig:
    block_m: int
    block_n: int
    block_r: int
    num_warps: int = 4
    num_stages: int = 1


def expand_config(max_len: int, h_out: int, rank: int, dtype: torch.dtype) -> ExpandConfig:
    """Block sizes for one launch: BLOCK_R covers the whole rank; the B tile stays <= 32 KiB."""
    block_m = min(64, max(16, triton.next_power_of_2(max_len)))
    block_r = max(16, triton.next_power_of_2(rank))
    elem = torch.finfo(dtype).bits // 8
    block_n = 128
    while block_n > 16 and (block_n > max(16, triton.next_power_of_2(h_out)) or block_r * block_n * elem > 32 * 1024):
        block_n //= 2
    return ExpandConfig(block_m, block_n, block_r)


def sgmv_expand(y: torch.Tensor, lora_b: torch.Tensor, seg: SegmentMeta, out: torch.Tensor,
                col_offset: int = 0) -> torch.Tensor:
    """Semantics: out[s[i]:s[i]+n[i], c:c+H_out] += y[s[i]:s[i]+n[i]] @ lora_b[slot[i]].T, fp32 accumulation.

    y [T, R] (R <= 128), lora_b [S, H_out, R], out [T, H] with c = col_offset, c + H_out <= H.
    Modifies `out` in place (rows in no segment untouched) and returns it. Needs CUDA tensors, or CPU
    tensors with TRITON_INTERPRET=1 set before import (Triton's interpreter).
    """
    _, rank, h_out = check_expand(y, lora_b, seg, out, col_offset)
    if not 1 <= rank <= MAX_RANK or y.stride(1) != 1 or lora_b.stride(2) != 1 or out.stride(1) != 1:
        raise ValueError(f"sgmv_expand: no kernel for h_out={h_out} r={rank} dtype={y.dtype} y.stride={y.stride()} "
                         f"lora_b.stride={lora_b.stride()} out.stride={out.stride()} "
                         f"(want 1 <= r <= {MAX_RANK}, unit last strides)")
    interpreted = check_launch("sgmv_expand", _sgmv_expand_kernel, y.device, seg)
    if seg.max_len == 0 or h_out == 0:
        return out
    cfg = expand_config(seg.max_len, h_out, rank, y.dtype)
    grid = (triton.cdiv(seg.max_len, cfg.block_m) * triton.cdiv(h_out, cfg.block_n), seg.num_segments)
    _sgmv_expand_kernel[grid](
        y, lora_b, out, seg.starts, seg.lens, seg.slots,
        h_out, rank, y.stride(0), lora_b.stride(0), lora_b.stride(1), out.stride(0), col_offset,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_R=cfg.block_r, UPCAST=interpreted,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out
