"""Pure-torch SGMV: one matmul per segment in float32. Obviously right and slow: the test oracle.

Same signatures as the public ops in `kernels/__init__.py`; see there for the semantics.
"""
from __future__ import annotations

import torch

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
