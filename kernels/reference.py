"""Pure-torch references (test oracles): SGMV (one matmul per segment in float32) and NF4 dequantize / linear.

Same signatures as the public ops in `kernels/__init__.py`; see there for the semantics.
"""
from __future__ import annotations

import torch

from kernels.nf4_format import NF4_CODE
from kernels.segments import SegmentMeta
from kernels.shapes import check_expand, check_shrink


def sgmv_shrink(x: torch.Tensor, lora_a: torch.Tensor, seg: SegmentMeta) -> torch.Tensor:
    """y[s:s+n] = x[s:s+n] @ lora_a[slot].T per segment; rows in no segment are 0.
    x [T, H_in], lora_a [S, R, H_in] → y [T, R] in x.dtype."""
    num_tokens, _, rank = check_shrink(x, lora_a, seg)
    y = torch.zeros(num_tokens, rank, dtype=torch.float32, device=x.device)
    for start, n, slot in zip(seg.start_list, seg.len_list, seg.slot_list):
        y[start:start + n] = x[start:start + n].float() @ lora_a[slot].float().T
    return y.to(x.dtype)


def sgmv_expand(y: torch.Tensor, lora_b: torch.Tensor, seg: SegmentMeta, out: torch.Tensor,
                col_offset: int = 0) -> torch.Tensor:
    """out[s:s+n, col_offset:col_offset+H_out] += y[s:s+n] @ lora_b[slot].T per segment, in place.
    y [T, R], lora_b [S, H_out, R], out [T, H] → out; rows in no segment are untouched."""
    _, _, h_out = check_expand(y, lora_b, seg, out, col_offset)
    cols = slice(col_offset, col_offset + h_out)
    for start, n, slot in zip(seg.start_list, seg.len_list, seg.slot_list):
        rows = slice(start, start + n)
        out[rows, cols] = (out[rows, cols].float() + y[rows].float() @ lora_b[slot].float().T).to(out.dtype)
    return out


def nf4_dequantize(w) -> torch.Tensor:
    """NF4Weight (kernels/nf4_format.py) -> W [N, K] in w.dtype: NF4[nibble] * absmax[block] in float32, then cast.
    Nibbles in packed byte i: value 2i is the high one, 2i+1 the low one."""
    n = w.shape[0] * w.shape[1]
    packed = w.packed.reshape(-1)
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[:n].long()
    values = NF4_CODE.to(packed.device)[codes]
    scale = w.block_absmax().repeat_interleave(w.blocksize)[:n]
    return (values * scale).reshape(w.shape).to(w.dtype)


def nf4_linear(x: torch.Tensor, w, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ dequantize(w).T (+ bias): x [T, K], w an NF4Weight of shape [N, K] -> y [T, N] in x.dtype,
    computed in float32."""
    y = x.float() @ nf4_dequantize(w).float().T
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype)
