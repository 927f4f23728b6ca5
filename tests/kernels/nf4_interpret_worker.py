"""Runs the Triton NF4 matmul in Triton's interpreter and saves its outputs for test_nf4_triton.py.

    TRITON_INTERPRET=1 python -m tests.kernels.nf4_interpret_worker OUT.pt

`@triton.jit` reads TRITON_INTERPRET when kernels/nf4.py is imported, so this runs in its own process.
"""
import sys

import torch
from triton.runtime.interpreter import InterpretedFunction

from kernels.nf4 import _nf4_matmul_kernel, nf4_matmul
from kernels.nf4_format import quantize_nf4
from tests.kernels.cases import SEED

# (tokens, part rows, K, dtype, double quant, bias), small: the interpreter runs each program in Python.
# K=96: blocks span rows and a K tile is masked; rows (40, 24, 24): a fused qkv-like layer, masked N tiles;
# 70 tokens: two M tiles, the second masked.
CASES = [(tokens, rows, k, dtype, double_quant, bias)
         for tokens, rows, k, dtype, double_quant, bias in (
             (5, (40, 24, 24), 96, torch.float32, False, True),
             (5, (40, 24, 24), 96, torch.float32, True, False),
             (70, (64,), 128, torch.float32, True, True),
             (3, (80,), 64, torch.bfloat16, False, False),
             (17, (40, 24), 96, torch.bfloat16, True, True),
             (8, (32,), 64, torch.float16, True, True))]


def case_id(case) -> str:
    tokens, rows, k, dtype, double_quant, bias = case
    return (f"T{tokens}-N{'+'.join(map(str, rows))}-K{k}-{str(dtype).removeprefix('torch.')}"
            f"{'-double' if double_quant else ''}{'-bias' if bias else ''}")


def case_inputs(case):
    tokens, rows, k, dtype, double_quant, bias = case
    g = torch.Generator().manual_seed(SEED + tokens)
    parts = [quantize_nf4((torch.randn(n, k, generator=g) * 0.1).to(dtype), double_quant) for n in rows]
    x = torch.randn(tokens, k, generator=g).to(dtype)
    b = torch.randn(sum(rows), generator=g).to(dtype) if bias else None
    return x, parts, b


def main(path: str) -> None:
    assert isinstance(_nf4_matmul_kernel, InterpretedFunction), "TRITON_INTERPRET=1 was not set"
    results = {}
    for case in CASES:
        x, parts, bias = case_inputs(case)
        results[case_id(case)] = nf4_matmul(x, parts, bias)
    torch.save(results, path)


if __name__ == "__main__":
    main(sys.argv[1])
