"""SGMV shrink on CUDA (Triton): project each segment's tokens down to its adapter's rank.

Modelled on punica's sgmv shrink and vLLM's `lora_shrink_op.py`: one program per (row tile of a segment,
split of H_in); the adapter slot is read per segment, so any mix of adapters runs in one launch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.segments import SegmentMeta
from kernels.shapes import check_shrink

MAX_RANK = 128
MAX_SEGMENTS = 65535  # grid axis 1 limit on CUDA


@triton.jit
def _sgmv_shrink_kernel(
        x_ptr, a_ptr, y_ptr, starts_ptr, lens_ptr, slots_ptr,
        h_in, rank, x_stride, a_stride_slot, a_stride_rank, y_stride,
        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
        UPCAST: tl.constexpr):
    """Grid (cdiv(max_len, BLOCK_M), num_segments, SPLIT_K): program (m, i, k) computes rows
    [m*BLOCK_M, (m+1)*BLOCK_M) of segment i over the k-th of SPLIT_K interleaved shares of H_in.
    x [T, H_in], a [S, R, H_in], y [T, R] (fp32, accumulated with atomics, when SPLIT_K > 1);
    all with unit last stride. BLOCK_R >= 16 is the rank padded up; the padding is masked to zero."""
    pid_m = tl.program_id(0)
    seg = tl.program_id(1)
    pid_k = tl.program_id(2)
    seg_len = tl.load(lens_ptr + seg)
    if pid_m * BLOCK_M >= seg_len:
        return
    start = tl.load(starts_ptr + seg).to(tl.int64)
    slot = tl.load(slots_ptr + seg).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < seg_len
    mask_r = offs_r < rank
    rows = start + offs_m
    x_ptrs = x_ptr + rows[:, None] * x_stride + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    a_ptrs = a_ptr + slot * a_stride_slot + offs_r[None, :] * a_stride_rank + offs_k[:, None]  # [BLOCK_K, BLOCK_R]
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, h_in, SPLIT_K * BLOCK_K):
        mask_k = offs_k < h_in - k0
        xt = tl.load(x_ptrs + k0, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        at = tl.load(a_ptrs + k0, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        if UPCAST:  # the interpreter's tl.dot is wrong for bf16
            xt = xt.to(tl.float32)
            at = at.to(tl.float32)
        acc += tl.dot(xt, at, input_precision="tf32x3")  # fp32 inputs: 3xTF32, ~fp32 accurate
    y_ptrs = y_ptr + rows[:, None] * y_stride + offs_r[None, :]
    mask = mask_m[:, None] & mask_r[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(y_ptrs, acc, mask=mask)


@dataclass(frozen=True)
class ShrinkConfig:
    block_m: int
    block_r: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 2


def shrink_config(max_len: int, num_segments: int, h_in: int, rank: int, dtype: torch.dtype) -> ShrinkConfig:
    """Block sizes for one launch. Tiles stay under ~96 KiB of shared memory (fits sm_80 and sm_90);
    H_in is split while there are fewer than ~128 programs, so a few short segments still fill the GPU."""
    block_m = min(64, max(16, triton.next_power_of_2(max_len)))
    block_r = max(16, triton.next_power_of_2(rank))
    elem = torch.finfo(dtype).bits // 8
    block_k = 256
    while block_k > 16 and (block_k > max(16, triton.next_power_of_2(h_in))
                            or (block_m + block_r) * block_k * elem * 2 > 96 * 1024):
        block_k //= 2
    programs = triton.cdiv(max(max_len, 1), block_m) * max(num_segments, 1)
    split_k = 1
    while programs * split_k < 128 and split_k * 2 <= min(16, triton.cdiv(h_in, block_k)):
        split_k *= 2
    return ShrinkConfig(block_m, block_r, block_k, split_k)


def check_launch(op: str, kernel, device: torch.device, seg: SegmentMeta) -> bool:
    """Checks shared by the Triton ops → whether `kernel` runs in Triton's interpreter.
    `@triton.jit` reads TRITON_INTERPRET when the kernel module is imported; nothing compiles before launch."""
    interpreted = not isinstance(kernel, triton.runtime.JITFunction)
    if device.type != "cuda" and not interpreted:
        raise ValueError(f"{op}: Triton kernels need CUDA tensors, got {device} "
                         f"(or set TRITON_INTERPRET=1 before importing kernels)")
    if seg.starts.device != device or seg.num_segments > MAX_SEGMENTS:
        raise ValueError(f"{op}: segments on {seg.starts.device} ({seg.num_segments} of them), tokens on "
                         f"{device} (want the same device, at most {MAX_SEGMENTS} segments)")
    return interpreted


def sgmv_shrink(x: torch.Tensor, lora_a: torch.Tensor, seg: SegmentMeta) -> torch.Tensor:
    """Semantics: y[s[i]:s[i]+n[i]] = x[s[i]:s[i]+n[i]] @ lora_a[slot[i]].T, fp32 accumulation.

    x [T, H_in], lora_a [S, R, H_in] (R <= 128) → new y [T, R] in x.dtype; rows in no segment are 0.
    Needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before import (Triton's interpreter).
    """
    num_tokens, h_in, rank = check_shrink(x, lora_a, seg)
    if not 1 <= rank <= MAX_RANK or x.stride(1) != 1 or lora_a.stride(2) != 1:
        raise ValueError(f"sgmv_shrink: no kernel for h_in={h_in} r={rank} dtype={x.dtype} x.stride={x.stride()} "
                         f"lora_a.stride={lora_a.stride()} (want 1 <= r <= {MAX_RANK}, unit last strides)")
    interpreted = check_launch("sgmv_shrink", _sgmv_shrink_kernel, x.device, seg)
    cfg = shrink_config(seg.max_len, seg.num_segments, h_in, rank, x.dtype)
    y = torch.zeros(num_tokens, rank, device=x.device, dtype=torch.float32 if cfg.split_k > 1 else x.dtype)
    if seg.max_len > 0:
        grid = (triton.cdiv(seg.max_len, cfg.block_m), seg.num_segments, cfg.split_k)
        _sgmv_shrink_kernel[grid](
            x, lora_a, y, seg.starts, seg.lens, seg.slots,
            h_in, rank, x.stride(0), lora_a.stride(0), lora_a.stride(1), y.stride(0),
            BLOCK_M=cfg.block_m, BLOCK_R=cfg.block_r, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k,
            UPCAST=interpreted, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y.to(x.dtype)
