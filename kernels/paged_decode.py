"""Paged decode attention on the CPU, reading each sequence's KV blocks in place (kernels/paged_decode.c).

The torch path gathers every decoding sequence's blocks into a dense tensor per layer and step, then calls SDPA:
at 32 sequences that copy is ~12% of a 160M decode step (bench/step_floor.py --gather-path). This kernel does
the same attention for one query per sequence without the copy. `paged_decode_ref` is its torch reference.

Built and loaded by kernels/native.py (compiled once per machine; OpenMP on torch's worker team). It
parallelises over pieces of the sequences' keys (kernels/attend.h: a sequence is cut by its own length, so a
row's result never depends on its batch). `available()` is False where no compiler works
or `PEFTSERVE_NATIVE_KERNELS=0`; callers then use the reference.
"""
from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn.functional as F

from kernels import native

DTYPES = {torch.float32: "paged_decode_f32", torch.bfloat16: "paged_decode_bf16"}
MAX_HEAD_DIM = 512         # kernels/attend.h ATT_MAX_D


def paged_decode_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     mask: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, H, D]; k_cache, v_cache [NBLK, BS, KVH, D]; block_tables [B, NB] long; mask [B, NB * BS] bool
    (True = attend) -> [B, H, D]: each query attends to its sequence's keys (its blocks in table order)."""
    b, nb = block_tables.shape
    _, bs, kvh, d = k_cache.shape
    kg = k_cache.index_select(0, block_tables.reshape(-1)).view(b, nb * bs, kvh, d).transpose(1, 2)
    vg = v_cache.index_select(0, block_tables.reshape(-1)).view(b, nb * bs, kvh, d).transpose(1, 2)
    out = F.scaled_dot_product_attention(q[:, :, None], kg, vg, attn_mask=mask[:, None, None], scale=scale,
                                         enable_gqa=True)
    return out[:, :, 0]


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 mask: torch.Tensor, scale: float) -> torch.Tensor:
    """`paged_decode_ref` computed by the C kernel (rows with no attended key get zeros). Needs `supports(...)`."""
    b, h, d = q.shape
    nb = block_tables.shape[1]
    _, bs, kvh, _ = k_cache.shape
    assert supports(q, k_cache, v_cache, block_tables, mask), "paged_decode: unsupported inputs"
    out = q.new_empty(b, h, d)
    fn = getattr(_library(), DTYPES[q.dtype])
    threads = torch.get_num_threads()
    fn(q.data_ptr(), q.stride(0), q.stride(1), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(),
       mask.data_ptr(), mask.stride(0), out.data_ptr(), b, h, kvh, d, nb, bs, scale, threads)
    return out


def supports(q, k_cache, v_cache, block_tables, mask) -> bool:
    """Whether the kernel takes these tensors: CPU, fp32 / bf16, caches contiguous, head elements contiguous."""
    return (q.device.type == "cpu" and q.dtype in DTYPES and k_cache.dtype == q.dtype == v_cache.dtype
            and q.dim() == 3 and q.stride(2) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
            and block_tables.dtype == torch.long and block_tables.is_contiguous()
            and mask.dtype == torch.bool and mask.dim() == 2 and mask.stride(1) == 1
            and mask.shape[1] == block_tables.shape[1] * k_cache.shape[1]
            and q.shape[1] % k_cache.shape[2] == 0 and q.shape[2] <= MAX_HEAD_DIM and available())


def available() -> bool:
    return _library() is not None


@functools.cache
def _library() -> ctypes.CDLL | None:
    p, i, l = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
    return native.load_functions("paged_decode", DTYPES.values(),
                                 [p, l, l, p, p, p, p, l, p] + [i] * 6 + [ctypes.c_float, i])
