"""Runs the Triton SGMV kernels in Triton's interpreter and saves their outputs for test_triton_interpret.py.

    TRITON_INTERPRET=1 python -m tests.kernels.triton_interpret_worker OUT.pt

`@triton.jit` reads TRITON_INTERPRET when kernels/sgmv_*.py are imported, so this runs in its own process
with the variable set, whatever else the test session imported first.
"""
import sys

import torch
from triton.runtime.interpreter import InterpretedFunction

from kernels.sgmv_expand import _sgmv_expand_kernel, sgmv_expand
from kernels.sgmv_shrink import _sgmv_shrink_kernel, sgmv_shrink
from tests.kernels.cases import make_inputs, segment_layout

H_OUT, NUM_SLOTS, COL_OFFSET = 150, 5, 3  # H_OUT = one full 128-column tile + a masked one
# (layout, num_tokens, rank, dtype, h_in), small: the interpreter runs each program in Python.
# h_in=300 is two 256-wide K blocks plus a tail (split-K with atomics); h_in=72 is one masked block (no split).
CASES = [(layout, num_tokens, rank, dtype, h_in)
         for layout, num_tokens in (("distinct", 6), ("zipf", 40), ("empty", 12), ("base_interleaved", 28),
                                    ("skewed", 40))
         for rank, dtype, h_in in ((16, torch.float32, 300), (5, torch.float16, 72), (33, torch.bfloat16, 300),
                                   (16, torch.bfloat16, 72))]


def case_id(case) -> str:
    layout, num_tokens, rank, dtype, h_in = case
    return f"{layout}-T{num_tokens}-r{rank}-{str(dtype).removeprefix('torch.')}-h{h_in}"


def case_inputs(case):
    layout, num_tokens, rank, dtype, h_in = case
    seg = segment_layout(layout, num_tokens, NUM_SLOTS)
    return seg, make_inputs(seg, h_in, H_OUT, rank, NUM_SLOTS, dtype, extra_cols=COL_OFFSET + 2)


def main(path: str) -> None:
    assert isinstance(_sgmv_shrink_kernel, InterpretedFunction), "TRITON_INTERPRET=1 was not set"
    assert isinstance(_sgmv_expand_kernel, InterpretedFunction), "TRITON_INTERPRET=1 was not set"
    results = {}
    for case in CASES:
        seg, t = case_inputs(case)
        results[case_id(case)] = dict(
            y=sgmv_shrink(t["x"], t["lora_a"], seg),
            out=sgmv_expand(t["y"], t["lora_b"], seg, t["out"], COL_OFFSET))
    torch.save(results, path)


if __name__ == "__main__":
    main(sys.argv[1])
