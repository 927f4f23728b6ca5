"""NF4 quantization vs bitsandbytes itself on random weights: the same bytes (packed nibbles, absmax, nested
absmax, offset, code tables), the same dequantized values, the same checkpoint tensors; our CPU linear vs the
torch reference."""
from __future__ import annotations

import json

import bitsandbytes.functional as bnbf
import pytest
import torch
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

from kernels import reference
from kernels.nf4 import DequantScratch, NF4Linear
from kernels.nf4_format import DYNAMIC_CODE, NF4_CODE, from_state_dict, quantize_nf4, to_state_dict
from tests.kernels.cases import SEED, TOL

# [N, K]: transformer-like widths, K not a multiple of the block (blocks span rows), a short last block, odd N*K
SHAPES = [(64, 128), (576, 576), (96, 160), (100, 33), (7, 5), (1536, 64)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def weight(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.rand(shape[0], 1, generator=g) * 0.2   # rows of different scale
    w[0, : min(shape[1], 70)] = 0                  # an all-zero block (absmax 0)
    return w.to(dtype)


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_quantize_equals_bitsandbytes(shape, dtype, double_quant):
    w = weight(shape, dtype, SEED + shape[0])
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    ours = quantize_nf4(w, double_quant)
    assert torch.equal(ours.packed, packed)
    assert torch.equal(ours.absmax, state.absmax)
    assert torch.equal(NF4_CODE, state.code)
    assert ours.shape == tuple(state.shape) and ours.dtype == state.dtype
    if double_quant:
        assert ours.absmax.dtype == torch.uint8
        assert torch.equal(ours.nested_absmax, state.state2.absmax)
        assert torch.equal(ours.offset, state.offset)
        assert torch.equal(DYNAMIC_CODE, state.state2.code)
    else:
        assert ours.nested_absmax is None and ours.absmax.dtype == torch.float32


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_dequantize_equals_bitsandbytes(shape, dtype, double_quant):
    w = weight(shape, dtype, SEED + 1 + shape[0])
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    ours = quantize_nf4(w, double_quant)
    got = reference.nf4_dequantize(ours)
    if shape[1] % 64 == 0 and shape[1] % 2 == 0:
        want = bnbf.dequantize_4bit(packed, state)
    else:
        # bnb's AVX-512 CPU kernel looks block scales up per row, right only when K % 64 == 0; its portable
        # implementation (the default backend) is the format's meaning for the other shapes.
        absmax = state.absmax if not double_quant else (
            bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset)
        want = _dequantize_4bit_compute(packed.reshape(-1), absmax, NF4_CODE, 64, shape, dtype)
    assert got.dtype == want.dtype and torch.equal(got, want)
    fast = NF4Linear([ours]).dequantize()
    assert torch.equal(fast, want)
    assert (got.float() - w.float()).abs().max() <= w.float().abs().max() * 0.2   # it is W, 4-bit


def test_checkpoint_tensors_equal_bitsandbytes_state_dict():
    """What transformers saves for a 4-bit module (QuantState.as_dict(packed=True)) and our to/from_state_dict."""
    w = weight((96, 128), torch.float32, SEED)
    for double_quant in (False, True):
        packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
        theirs = {"": packed, **state.as_dict(packed=True)}
        ours = to_state_dict(quantize_nf4(w, double_quant))
        assert set(ours) == set(theirs)
        for key in theirs:
            if key.startswith("quant_state."):
                assert json.loads(bytes(ours[key].tolist())) == json.loads(bytes(theirs[key].tolist()))
            else:
                assert torch.equal(ours[key], theirs[key]), key
        back = from_state_dict("m.weight", theirs, torch.float32)
        assert torch.equal(reference.nf4_dequantize(back), bnbf.dequantize_4bit(packed, state))


def test_from_state_dict_rejects_what_it_cannot_serve():
    tensors = to_state_dict(quantize_nf4(weight((64, 64), torch.float32, SEED)))
    fp4 = dict(tensors)
    fp4["quant_state.bitsandbytes__fp4"] = fp4.pop("quant_state.bitsandbytes__nf4")
    with pytest.raises(ValueError, match="FP4"):
        from_state_dict("m.weight", fp4, torch.float32)
    short = dict(tensors, absmax=tensors["absmax"][:-1])
    with pytest.raises(ValueError, match="absmax values"):
        from_state_dict("m.weight", short, torch.float32)
    missing = {k: v for k, v in tensors.items() if k != "absmax"}
    with pytest.raises(ValueError, match="m.weight.absmax"):
        from_state_dict("m.weight", missing, torch.float32)


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_linear_equals_reference(dtype, double_quant):
    """Fused layers of several parts (K=5: the second part starts mid-byte), bias, a shared scratch reused by
    layers of different shapes."""
    g = torch.Generator().manual_seed(SEED)
    scratch = DequantScratch()
    for k, rows in ((96, (33, 64, 7)), (64, (128,)), (5, (3, 4))):
        parts = [quantize_nf4(torch.randn(n, k, generator=g).to(dtype), double_quant) for n in rows]
        op = NF4Linear(parts, scratch)
        x = torch.randn(9, k, generator=g).to(dtype)
        bias = torch.randn(sum(rows), generator=g).to(dtype)
        want = torch.cat([reference.nf4_linear(x, p) for p in parts], dim=1).float() + bias.float()
        torch.testing.assert_close(op(x, bias), want.to(dtype), **TOL[dtype])
        assert torch.equal(op.dequantize(sum(rows[:-1]), rows[-1]), reference.nf4_dequantize(parts[-1]))
    with pytest.raises(ValueError, match="nf4_linear"):
        op(torch.randn(3, 65).to(dtype))
