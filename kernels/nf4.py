"""NF4 linear layers: y = x @ dequantize(W).T (+ b), with W stored in bitsandbytes' 4-bit format (kernels/nf4_format.py).

A fused linear of ours (q/k/v, gate/up) holds one NF4Weight per HF module, stacked by rows, because transformers
quantizes each module on its own (its own absmax blocks, its own double-quant offset): `NF4Linear.parts`.

Backends, picked by the input's device:
- CUDA: a Triton kernel that dequantizes tiles of W in registers and feeds them to `tl.dot` (nothing of W is
  ever materialised at full precision), one launch per part writing its columns of y.
- CPU: each part is dequantized just in time into one scratch buffer shared by every layer of the model
  (`DequantScratch`), then one `F.linear`: no layer keeps a full-precision copy. Dequantizing is a 256-entry
  table lookup per byte (two float32 values at once, as one int64) and one multiply by the block scales that
  also rounds to the compute dtype: three passes over the layer, a cost per step that batching amortises
  (bench/nf4.py measures it end to end).
Both compute exactly what bitsandbytes does: float32 code * absmax, rounded to the compute dtype, then the matmul.
kernels/reference.py (`nf4_dequantize`, `nf4_linear`) is the oracle.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.nf4_format import DYNAMIC_CODE, NF4_CODE, NESTED_BLOCKSIZE, NF4Weight

# byte -> (NF4[byte >> 4], NF4[byte & 15]) as two float32 in one int64 (the high nibble is the first value)
_PAIRS = torch.stack([NF4_CODE.repeat_interleave(16), NF4_CODE.repeat(16)], 1).contiguous().view(torch.int64).view(-1)


class DequantScratch:
    """Flat buffers reused by every NF4 layer of a model on the CPU path (one model runs one step at a time).
    Not for concurrent use: code off the engine thread (adapter loading) dequantizes into fresh tensors."""

    def __init__(self):
        self._buffers: dict[tuple, torch.Tensor] = {}

    def get(self, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (name, dtype, device)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel]


class NF4Linear:
    """The weight of one linear layer, [N, K] = the parts' rows stacked, each part an NF4Weight [n_i, K].
    Call it as `y = op(x, bias)`: x [T, K] in the compute dtype -> y [T, N]."""

    def __init__(self, parts: list[NF4Weight], scratch: DequantScratch | None = None):
        k = {p.shape[1] for p in parts}
        dtypes = {p.dtype for p in parts}
        if len(k) != 1 or len(dtypes) != 1:
            raise ValueError(f"NF4Linear: parts disagree on in_features {k} or dtype {dtypes}")
        self.parts = parts
        self.shape = (sum(p.shape[0] for p in parts), k.pop())
        self.dtype = dtypes.pop()
        self.scratch = scratch

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def to(self, device) -> "NF4Linear":
        return NF4Linear([p.to(device) for p in self.parts], self.scratch)

    def dequantize(self, first: int = 0, rows: int | None = None) -> torch.Tensor:
        """A new tensor of W[first:first+rows] ([rows, K], default all of W) in the compute dtype (what DoRA's
        column norm and tests read); one part is dequantized alone when the rows are exactly that part."""
        rows = self.shape[0] - first if rows is None else rows
        at = 0
        for part in self.parts:
            if (at, part.shape[0]) == (first, rows):
                return dequantize(NF4Linear([part]), None)
            at += part.shape[0]
        return dequantize(self, None)[first:first + rows]

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.shape[1] or x.dtype != self.dtype:
            raise ValueError(f"nf4_linear: want x [T, {self.shape[1]}] {self.dtype}, got {tuple(x.shape)} {x.dtype}")
        if x.device.type == "cuda":
            return nf4_matmul(x, self.parts, bias)
        return F.linear(x, dequantize(self, self.scratch), bias)


def dequantize(op: NF4Linear, scratch: DequantScratch | None) -> torch.Tensor:
    """[N, K] in op.dtype: into the scratch buffer when given (valid until the next call), else a new tensor."""
    n, k = op.shape
    device = op.parts[0].packed.device
    new = lambda name, numel, dtype: (torch.empty(numel, dtype=dtype, device=device) if scratch is None  # noqa: E731
                                      else scratch.get(name, numel, dtype, device))
    flat = new("fp32", n * k + 2, torch.float32)        # +2: an odd part's last pair spills one value
    out = flat if op.dtype == torch.float32 else new("out", n * k, op.dtype)
    index = new("index", max(p.packed.numel() for p in op.parts), torch.int32)
    pairs, at = _PAIRS.to(device), 0
    for part in op.parts:
        numel = part.shape[0] * part.shape[1]
        if at % 2:
            flat[at:at + numel] = _codes_slow(part)
        else:
            m = part.packed.numel()
            idx = index[:m]
            idx.copy_(part.packed.view(-1))
            torch.index_select(pairs, 0, idx, out=flat[at:at + 2 * m].view(torch.int64))
        _scale(flat[at:at + numel], part, out[at:at + numel])
        at += numel
    return out[:n * k].view(n, k)


def _scale(values: torch.Tensor, part: NF4Weight, out: torch.Tensor) -> None:
    """out = values * absmax of their block: float32 products (as bitsandbytes), stored in out's dtype (rounded
    to nearest even); values [numel] float32 codes, out may be values itself."""
    absmax = part.block_absmax()
    bs = part.blocksize
    full = values.numel() - values.numel() % bs
    torch.mul(values[:full].view(-1, bs), absmax[:full // bs].view(-1, 1), out=out[:full].view(-1, bs))
    if full < values.numel():
        torch.mul(values[full:], absmax[-1], out=out[full:])


def _codes_slow(part: NF4Weight) -> torch.Tensor:
    """[numel] float32 NF4 codes of a part (unscaled), for a part starting at an odd offset of the buffer."""
    packed = part.packed.reshape(-1)
    nibbles = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[:part.shape[0] * part.shape[1]]
    return NF4_CODE.to(packed.device)[nibbles.long()]


# --- CUDA: fused dequantize-matmul ------------------------------------------------------------------------------

@triton.jit
def _nf4_matmul_kernel(
        x_ptr, packed_ptr, absmax_ptr, nested_ptr, offset_ptr, code_ptr, dyn_ptr, bias_ptr, y_ptr,
        num_tokens, n_out, k_in, x_stride, y_stride,
        BLOCKSIZE: tl.constexpr, NESTED_BLOCK: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr):
    """Grid (cdiv(T, BLOCK_M), cdiv(N, BLOCK_N)): y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]), fp32 accumulation.
    W[n, k] = code[nibble(n*K + k)] * absmax[(n*K + k) // BLOCKSIZE], rounded to x's dtype, where nibble i is the
    high half of packed byte i // 2 for even i; with NESTED, absmax[b] = dyn[absmax8[b]] * nested[b // 256] + offset.
    x [T, K], y [T, N] with unit last stride; packed [ceil(N*K/2)] uint8."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < num_tokens
    mask_n = offs_n < n_out
    row_base = offs_n.to(tl.int64) * k_in  # [BLOCK_N] flat index of W[n, 0]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if NESTED:
        offset = tl.load(offset_ptr)
    for k0 in range(0, k_in, BLOCK_K):
        ks = k0 + offs_k
        mask_k = ks < k_in
        xt = tl.load(x_ptr + offs_m[:, None] * x_stride + ks[None, :], mask=mask_m[:, None] & mask_k[None, :],
                     other=0.0)
        idx = row_base[None, :] + ks[:, None]  # [BLOCK_K, BLOCK_N]: flat index of W[n, k], i.e. of W.T[k, n]
        wmask = mask_k[:, None] & mask_n[None, :]
        byte = tl.load(packed_ptr + idx // 2, mask=wmask, other=0).to(tl.int32)
        nibble = (byte >> ((1 - (idx % 2).to(tl.int32)) * 4)) & 0xF
        code = tl.load(code_ptr + nibble)
        block = idx // BLOCKSIZE
        if NESTED:
            q = tl.load(absmax_ptr + block, mask=wmask, other=0).to(tl.int32)
            scale = tl.load(dyn_ptr + q) * tl.load(nested_ptr + block // NESTED_BLOCK, mask=wmask, other=0.0) + offset
        else:
            scale = tl.load(absmax_ptr + block, mask=wmask, other=0.0)
        w = (code * scale).to(x_ptr.dtype.element_ty)
        if UPCAST:  # the interpreter's tl.dot is wrong for bf16
            xt = xt.to(tl.float32)
            w = w.to(tl.float32)
        acc += tl.dot(xt, w, input_precision="tf32x3")  # fp32 inputs: 3xTF32, ~fp32 accurate
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * y_stride + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


@dataclass(frozen=True)
class MatmulConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2


def matmul_config(num_tokens: int, n_out: int, k_in: int) -> MatmulConfig:
    """Tiles: 16..64 tokens, 64 output columns, 64 K (one absmax block wide when K % 64 == 0)."""
    block_m = min(64, max(16, triton.next_power_of_2(max(num_tokens, 1))))
    block_n = min(64, max(16, triton.next_power_of_2(n_out)))
    block_k = min(64, max(16, triton.next_power_of_2(k_in)))
    return MatmulConfig(block_m, block_n, block_k)


def nf4_matmul(x: torch.Tensor, parts: list[NF4Weight], bias: torch.Tensor | None = None) -> torch.Tensor:
    """Semantics: y = x @ cat([dequantize(p) for p in parts]).T (+ bias), fp32 accumulation.

    x [T, K] (fp32 / bf16 / fp16, unit last stride), parts NF4Weight [n_i, K] on x's device -> new y [T, sum n_i]
    in x.dtype. Needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before import.
    """
    interpreted = not isinstance(_nf4_matmul_kernel, triton.runtime.JITFunction)
    if x.device.type != "cuda" and not interpreted:
        raise ValueError(f"nf4_matmul: Triton kernels need CUDA tensors, got {x.device} "
                         f"(or set TRITON_INTERPRET=1 before importing kernels)")
    num_tokens, k_in = x.shape
    if x.stride(1) != 1 or any(p.shape[1] != k_in for p in parts):
        raise ValueError(f"nf4_matmul: no kernel for x {tuple(x.shape)} stride {x.stride()} and parts "
                         f"{[p.shape for p in parts]} (want x [T, K] with unit last stride, parts [n, K])")
    n_total = sum(p.shape[0] for p in parts)
    y = torch.empty(num_tokens, n_total, dtype=x.dtype, device=x.device)
    if num_tokens == 0:
        return y
    code, dyn = NF4_CODE.to(x.device), DYNAMIC_CODE.to(x.device)
    col = 0
    for part in parts:
        n_out = part.shape[0]
        cfg = matmul_config(num_tokens, n_out, k_in)
        out = y[:, col:col + n_out]
        nested = part.nested_absmax is not None
        b = bias[col:col + n_out] if bias is not None else x
        grid = (triton.cdiv(num_tokens, cfg.block_m), triton.cdiv(n_out, cfg.block_n))
        _nf4_matmul_kernel[grid](
            x, part.packed, part.absmax, part.nested_absmax if nested else part.absmax,
            part.offset if nested else code, code, dyn, b, out,
            num_tokens, n_out, k_in, x.stride(0), out.stride(0),
            BLOCKSIZE=part.blocksize, NESTED_BLOCK=NESTED_BLOCKSIZE, NESTED=nested, HAS_BIAS=bias is not None,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, UPCAST=interpreted,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        col += n_out
    return y
