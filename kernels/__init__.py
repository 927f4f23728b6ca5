"""Multi-LoRA SGMV ops (punica-style segmented gather matmul) and the one place that picks a backend.

A LoRA linear on a mixed batch of flat tokens x [T, H_in]:
    y = sgmv_shrink(x, lora_a, seg)                  # [T, R]
    sgmv_expand(y, lora_b, seg, out, col_offset)     # out[:, c:c+H_out] += per-segment y @ B.T
Weights are stacked per adapter slot and zero-padded to a common rank R, so adapters of different ranks
share one stack exactly (callers keep one stack per rank class, kernels.shapes.rank_class, so the padding stays
under 2x; kernel-ready layout; PEFT's own layouts, stacked):
    lora_a [S, R, H_in]   = lora_A.weight [r, in] per slot
    lora_b [S, H_out, R]  = lora_B.weight [out, r] per slot, with alpha/r folded in at load
Segments (which rows use which slot) are a `SegmentMeta`, built once per step; see kernels/segments.py.

Backends, chosen here by the tensors' device, never by import-time flags: CUDA → Triton kernels
(kernels/sgmv_shrink.py, kernels/sgmv_expand.py); anything else → torch (kernels/cpu.py).
kernels/reference.py is the float32 oracle. Importing this package compiles nothing.
Name clash to know: the package attributes `kernels.sgmv_shrink` / `kernels.sgmv_expand` are the dispatchers
below; the Triton host functions are `from kernels.sgmv_shrink import sgmv_shrink` (same for expand).
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from kernels import cpu
from kernels.segments import SegmentMeta
from kernels.sgmv_expand import sgmv_expand as _triton_expand
from kernels.sgmv_shrink import sgmv_shrink as _triton_shrink

__all__ = ["SegmentMeta", "backend", "sgmv_expand", "sgmv_shrink"]

_TRITON = SimpleNamespace(sgmv_shrink=_triton_shrink, sgmv_expand=_triton_expand)


def backend(device: torch.device):
    """The one place a backend is picked: Triton for CUDA tensors, torch (kernels/cpu.py) otherwise."""
    return _TRITON if device.type == "cuda" else cpu


def sgmv_shrink(x: torch.Tensor, lora_a: torch.Tensor, seg: SegmentMeta) -> torch.Tensor:
    """Semantics: y[s[i]:s[i]+n[i]] = x[s[i]:s[i]+n[i]] @ lora_a[slot[i]].T, fp32 accumulation.

    x [T, H_in], lora_a [S, R, H_in] → new y [T, R] in x.dtype; rows in no segment are 0.
    """
    return backend(x.device).sgmv_shrink(x, lora_a, seg)


def sgmv_expand(y: torch.Tensor, lora_b: torch.Tensor, seg: SegmentMeta, out: torch.Tensor,
                col_offset: int = 0) -> torch.Tensor:
    """Semantics: out[s[i]:s[i]+n[i], c:c+H_out] += y[s[i]:s[i]+n[i]] @ lora_b[slot[i]].T, fp32 accumulation.

    y [T, R], lora_b [S, H_out, R], out [T, H] with c = col_offset (slices of a fused qkv / gate_up output).
    Modifies `out` in place (rows in no segment untouched) and returns it.
    """
    return backend(y.device).sgmv_expand(y, lora_b, seg, out, col_offset)
