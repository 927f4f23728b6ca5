"""Runs the whole grouped bottleneck op (adapters/bottleneck_stacks.grouped_sublayer) with the Triton SGMV kernels in
Triton's interpreter, ranks chunked at the kernels' limit as on CUDA, and saves the outputs for
test_bottleneck_interpret.py:

    TRITON_INTERPRET=1 python -m tests.kernels.bottleneck_interpret_worker OUT.pt

The op picks a backend by device (CPU here), so this process points the `kernels` dispatchers at the Triton host
functions and sets the CPU chunk size to the Triton kernels' MAX_RANK. bf16 runs too: the host functions upcast
tl.dot inputs under the interpreter (whose bf16 tl.dot is wrong).
"""
import sys

import torch
from triton.runtime.interpreter import InterpretedFunction

import kernels
from adapters import bottleneck_stacks
from kernels.sgmv_expand import _sgmv_expand_kernel, sgmv_expand
from kernels.sgmv_shrink import MAX_RANK, _sgmv_shrink_kernel, sgmv_shrink
from tests.adapters.bottleneck_cases import mixed_case, run, stacks_of

DTYPES = (torch.float32, torch.bfloat16)


def main(path: str) -> None:
    assert isinstance(_sgmv_shrink_kernel, InterpretedFunction), "TRITON_INTERPRET=1 was not set"
    assert isinstance(_sgmv_expand_kernel, InterpretedFunction), "TRITON_INTERPRET=1 was not set"
    calls = []

    def shrink(x, w, seg):
        calls.append(("shrink", tuple(x.shape), tuple(w.shape)))
        return sgmv_shrink(x, w, seg)

    def expand(y, w, seg, out, col_offset=0):
        calls.append(("expand", tuple(y.shape), tuple(w.shape)))
        return sgmv_expand(y, w, seg, out, col_offset)
    kernels.sgmv_shrink, kernels.sgmv_expand = shrink, expand
    bottleneck_stacks.MAX_KERNEL_RANK["cpu"] = MAX_RANK
    results = {}
    for dtype in DTYPES:
        adapters, token_slots, o, r = mixed_case(dtype)
        calls.clear()
        h = run(stacks_of(dict(enumerate(adapters)), dtype), token_slots, adapters, o, r)
        results[str(dtype)] = dict(h=h, calls=list(calls))
    torch.save(results, path)


if __name__ == "__main__":
    main(sys.argv[1])
