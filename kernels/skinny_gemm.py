"""x @ W.T (+ b) for the few rows of a decode step on the CPU (kernels/skinny_gemm.c): the weights read once, as
a memory stream.

At one to a few dozen rows a linear is a read of its weight; the BLAS behind F.linear reaches that at one fp32 row
but not beyond (at 8 rows it took 2.4x its 1-row time on the development machine) nor in bf16 (half the read
bandwidth): bench/step_floor.py's matmul floor. `linear` sends up to MAX_ROWS[dtype] rows to the kernel and the rest to
F.linear, which is also its reference. Built and loaded by kernels/native.py; without it F.linear serves all.
"""
from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn.functional as F

from kernels import native

DTYPES = {torch.float32: "skinny_gemm_f32", torch.bfloat16: "skinny_gemm_bf16"}
# rows up to which the kernel beats F.linear (bench/skinny_gemm.py) and the decode stack's one-region driver on it
# beats its BLAS driver (bench/decode_drivers.py); beyond, the BLAS's blocked GEMM wins. fp32 with AVX-512: 32
# (2-core AVX-512 VM, 2026-12-04: whole SmolLM2 decode steps 0.89-0.92x at 24 rows, 0.93x at 32, 1.04x at 48); without
# it 16, where it was measured (the portable dots are slower)
MAX_ROWS = {torch.float32: 32 if native.cpu_has("avx512f") else 16, torch.bfloat16: 8}


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for 2-D x: by the kernel where `supports` says so, else F.linear."""
    if x.shape[0] <= MAX_ROWS.get(x.dtype, 0) and supports(x, weight, bias):
        return skinny_gemm(x, weight, bias)
    return F.linear(x, weight, bias)


def skinny_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) by the C kernel. Needs `supports(...)`."""
    m, k = x.shape
    n = weight.shape[0]
    y = x.new_empty(m, n)
    getattr(_library(), DTYPES[x.dtype])(x.data_ptr(), x.stride(0), weight.data_ptr(),
                                         None if bias is None else bias.data_ptr(), y.data_ptr(), n, m, n, k,
                                         torch.get_num_threads())
    return y


def supports(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """CPU, fp32 / bf16 alike, x 2-D with contiguous rows, weight contiguous [N, K], bias contiguous [N]."""
    return (x.device.type == "cpu" and x.dtype in DTYPES and weight.dtype == x.dtype and x.dim() == 2
            and x.stride(1) == 1 and x.shape[0] > 0 and weight.dim() == 2 and weight.is_contiguous()
            and weight.shape[1] == x.shape[1]
            and (bias is None or (bias.dtype == x.dtype and bias.is_contiguous() and bias.shape == weight.shape[:1]))
            and not x.requires_grad and available())


def available() -> bool:
    return _library() is not None


@functools.cache
def _library() -> ctypes.CDLL | None:
    p, i, l = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
    return native.load_functions("skinny_gemm", DTYPES.values(), [p, l, p, p, p, l, i, i, i, i])
