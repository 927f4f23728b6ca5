"""NF4 weights in bitsandbytes' format (QLoRA): quantize, and read / write transformers' checkpoint tensors.

A weight W [N, K] (out, in) is flattened row-major and cut into blocks of 64 values (the last block may be short):
    absmax[b] = max |W_flat[64b : 64b+64]|                             float32 [num_blocks]
    code      = argmin_j |W / absmax[b] - NF4[j]|  (ties: lower j)      4 bits per value
    packed[i] = code[2i] << 4 | code[2i+1]                             uint8 [ceil(N*K/2), 1] (high nibble first)
Double quantization (bnb_4bit_use_double_quant, bnb's `compress_statistics`) stores absmax in 8 bits:
    offset        = mean(absmax)                                       float32 scalar
    nested_absmax = per 256 absmax values, max |absmax - offset|         float32 [ceil(num_blocks/256)]
    absmax (8-bit)= index into the signed dynamic map of (absmax - offset) / nested_absmax, nearest
and dequantizes as absmax = DYNAMIC[q] * nested_absmax[b // 256] + offset.
Every number here is computed the way bitsandbytes 0.50 does on CPU (its default-backend `quantize_4bit`, its
C++ `quantize_blockwise` with a 65536-bin lookup table), so quantizing the same weights gives the same bytes.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import torch

BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256
QUANT_TYPE = "nf4"

# bitsandbytes' NF4 codebook (quantiles of N(0, 1), exact zero, 16 values, sorted).
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)
_NF4_BOUNDS = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' `create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)`: 256 sorted float32."""
    data: list[float] = []
    for i in range(7):
        items = 2 ** i + 1
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


DYNAMIC_CODE = dynamic_map()


@functools.cache
def _dynamic_lut() -> torch.Tensor:
    """bnb's C++ `build_quantize_lut`: 65536 evenly spaced values in [-1, 1] -> nearest code index (uint8).
    Built on first use, not at import: an import-time parallel op would give the importing thread an OpenMP
    team for the process's lifetime (kernels/cpu_threads.py)."""
    mids = 0.5 * (DYNAMIC_CODE[:-1] + DYNAMIC_CODE[1:])
    vals = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32)) / 65535.0
    return torch.searchsorted(mids, vals, side="left").to(torch.uint8)



@dataclass
class NF4Weight:
    """One NF4-quantized weight [N, K] in bitsandbytes' layout. `dtype`: what it dequantizes to (compute dtype).

    packed [ceil(N*K/2), 1] uint8; absmax [num_blocks] float32, or uint8 with `nested_absmax` [num_blocks/256]
    float32 and `offset` (a float32 scalar tensor) when double-quantized.
    """
    packed: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, int]
    dtype: torch.dtype
    nested_absmax: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    blocksize: int = BLOCKSIZE

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def nbytes(self) -> int:
        extra = 0 if self.nested_absmax is None else self.nested_absmax.nbytes + 4
        return self.packed.nbytes + self.absmax.nbytes + extra

    def block_absmax(self) -> torch.Tensor:
        """float32 [num_blocks]: the per-block scales, the 8-bit ones dequantized as bnb does (code * scale + offset)."""
        if self.nested_absmax is None:
            return self.absmax
        scale = self.nested_absmax.repeat_interleave(NESTED_BLOCKSIZE)[: self.absmax.numel()]
        return DYNAMIC_CODE.to(self.absmax.device)[self.absmax.long()] * scale + self.offset

    def to(self, device) -> "NF4Weight":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return NF4Weight(self.packed.to(device), self.absmax.to(device), self.shape, self.dtype,
                         move(self.nested_absmax), move(self.offset), self.blocksize)


def quantize_nf4(weight: torch.Tensor, double_quant: bool = False, dtype: torch.dtype | None = None) -> NF4Weight:
    """bitsandbytes' `quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=double_quant)`.

    weight [N, K] float32 / bfloat16 / float16 (quantized as given: pass it already in the model dtype, as
    transformers does). `dtype`: the compute dtype the result dequantizes to (default weight.dtype).
    """
    if weight.dim() != 2 or weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"quantize_nf4: want a 2-D float weight, got {tuple(weight.shape)} {weight.dtype}")
    flat = weight.detach().reshape(-1).float()
    n = flat.numel()
    full = n - n % BLOCKSIZE
    blocks = flat[:full].reshape(-1, BLOCKSIZE)
    absmax = blocks.abs().max(dim=-1)[0]
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if full < n:  # bnb divides the short last block (the full ones multiply by the reciprocal)
        last = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, last.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / last, -1, 1)])
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    q = torch.bucketize(scaled, _NF4_BOUNDS.to(scaled.device), out_int32=True).to(torch.uint8)
    packed = ((q[::2] << 4) | q[1::2]).unsqueeze(1)
    out = NF4Weight(packed, absmax, tuple(weight.shape), dtype or weight.dtype)
    if double_quant:
        offset = absmax.mean()
        out.absmax, out.nested_absmax = _quantize_dynamic(absmax - offset)
        out.offset = offset
    return out


def _quantize_dynamic(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bnb's CPU `quantize_blockwise(values, blocksize=256)` with the dynamic map -> (uint8 codes, float32 absmax).

    Per block: inv = 1 / absmax; index = uint16(((clamp(v * inv, -1, 1) + 1) * 0.5) * 65535 + 0.5) into the
    lookup table. The last multiply-add is one fused (FMA) rounding in bnb's build; emulated in float64.
    """
    n = values.numel()
    num_blocks = -(n // -NESTED_BLOCKSIZE)
    padded = torch.nn.functional.pad(values.float(), (0, num_blocks * NESTED_BLOCKSIZE - n)).view(num_blocks, -1)
    absmax = padded.abs().max(dim=-1)[0]
    inv = 1.0 / absmax
    norm = torch.clamp(padded * inv.view(-1, 1), -1, 1)
    half = (norm + 1.0) * 0.5                                 # float32, rounded twice as in C
    index = (half.double() * 65535.0 + 0.5).float().to(torch.int64)
    codes = _dynamic_lut().to(values.device)[index.clamp(0, 65535)]
    codes[absmax == 0] = 0
    return codes.reshape(-1)[:n].contiguous(), absmax


# --- transformers + bitsandbytes checkpoints -------------------------------------------------------------------
# A quantized Linear's state dict, e.g. for model.layers.0.self_attn.q_proj:
#   .weight [N*K/2, 1] uint8, .weight.absmax, .weight.quant_map [16],
#   (double quant) .weight.nested_absmax, .weight.nested_quant_map [256],
#   .weight.quant_state.bitsandbytes__nf4: uint8 bytes of JSON {"quant_type", "blocksize", "dtype", "shape",
#   and with double quant "nested_blocksize", "nested_dtype", "nested_offset"}.
STATE_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4",
                  "quant_state.bitsandbytes__fp4")


def to_state_dict(w: NF4Weight, compute_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The tensors transformers saves for weight `w` (keys relative to `<module>.weight`: "" is the weight)."""
    meta = {"quant_type": QUANT_TYPE, "blocksize": w.blocksize,
            "dtype": str(compute_dtype or w.dtype).removeprefix("torch."), "shape": list(w.shape)}
    out = {"": w.packed, "absmax": w.absmax, "quant_map": NF4_CODE.clone()}
    if w.double_quant:
        meta.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=w.offset.item())
        out.update(nested_absmax=w.nested_absmax, nested_quant_map=DYNAMIC_CODE.clone())
    out["quant_state.bitsandbytes__nf4"] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    return out


def from_state_dict(name: str, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> NF4Weight:
    """Inverse of `to_state_dict` for module weight `name` ("model.layers.0.mlp.up_proj.weight"); `dtype`: the
    compute dtype. Rejects what we cannot serve (FP4, other block sizes, other code tables) by name."""
    if "quant_state.bitsandbytes__fp4" in tensors:
        raise ValueError(f"{name}: 4-bit FP4 checkpoints are not supported (only nf4)")
    missing = [k for k in ("", "absmax", "quant_state.bitsandbytes__nf4") if k not in tensors]
    if missing:
        raise ValueError(f"{name}: bitsandbytes 4-bit weight lacks {', '.join(name + '.' + k for k in missing)}")
    meta = json.loads(bytes(tensors["quant_state.bitsandbytes__nf4"].to(torch.uint8).tolist()).decode())
    if meta.get("quant_type") != QUANT_TYPE or meta.get("blocksize") != BLOCKSIZE:
        raise ValueError(f"{name}: quant_type {meta.get('quant_type')!r} blocksize {meta.get('blocksize')} "
                         f"(want nf4, {BLOCKSIZE})")
    if "quant_map" in tensors and not torch.equal(tensors["quant_map"].float(), NF4_CODE):
        raise ValueError(f"{name}: quant_map is not bitsandbytes' NF4 codebook")
    shape = tuple(meta["shape"])
    packed = tensors[""].reshape(-1, 1)
    if len(shape) != 2 or packed.dtype != torch.uint8 or packed.shape[0] != -(shape[0] * shape[1] // -2):
        raise ValueError(f"{name}: packed weight {tuple(tensors[''].shape)} {tensors[''].dtype} does not hold "
                         f"shape {shape} (want uint8 [{-(shape[0] * shape[1] // -2)}, 1])")
    w = NF4Weight(packed, tensors["absmax"], shape, dtype)
    if "nested_absmax" in tensors:
        if meta.get("nested_blocksize") != NESTED_BLOCKSIZE or ("nested_quant_map" in tensors and not torch.equal(
                tensors["nested_quant_map"].float(), DYNAMIC_CODE)):
            raise ValueError(f"{name}: nested quantization other than bitsandbytes' (blocksize 256, dynamic map)")
        w.nested_absmax = tensors["nested_absmax"].float()
        w.offset = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32)
        w.absmax = w.absmax.to(torch.uint8)
    else:
        w.absmax = w.absmax.float()
    num_blocks = -(shape[0] * shape[1] // -BLOCKSIZE)
    if w.absmax.numel() != num_blocks:
        raise ValueError(f"{name}: {w.absmax.numel()} absmax values for {num_blocks} blocks")
    return w
