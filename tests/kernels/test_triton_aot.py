"""Ahead-of-time compile of the Triton SGMV kernels for sm_80 and sm_90 (no GPU needed: triton ships ptxas).

Catches what the interpreter lets through (layouts the backend rejects, shared memory over the limit, a
`tl.dot` that falls back from tensor cores), for the block configs the host functions actually pick.
"""
import pytest
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels.sgmv_expand import _sgmv_expand_kernel, expand_config
from kernels.sgmv_shrink import _sgmv_shrink_kernel, shrink_config

TARGETS = {80: 166912, 90: 232448}  # compute capability → max shared memory per block in bytes (A100, H100)
DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# (max_len, num_segments, hidden, rank): decode of 64 one-token segments at r=16; prefill of 4 x 512 at r=128;
# the bottleneck op (adapters/bottleneck_stacks.py): decode of 8 adapters in a 128-wide rank chunk of a wide
# bucket (ParBn r 512), and in a 64-wide bucket on hidden 1024 (Pfeiffer r 64 of bench/bottleneck.py)
SHAPES = {"decode": (1, 64, 4096, 16), "prefill": (512, 4, 4096, 128), "bn_decode_chunk": (1, 8, 4096, 128),
          "bn_decode_r64": (1, 8, 1024, 64)}

pytestmark = [
    pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION"),
    pytest.mark.skipif(not isinstance(_sgmv_shrink_kernel, triton.runtime.JITFunction),
                       reason="TRITON_INTERPRET=1 is set for the whole session: no compilable kernels in-process"),
]


def signature(kernel, pointers: dict[str, str]) -> dict[str, str]:
    """Every argument: its pointer type, "constexpr", or i32 for the sizes and strides."""
    return {p.name: "constexpr" if p.is_constexpr else pointers.get(p.name, "i32") for p in kernel.params}


def compile_for(kernel, pointers, constexprs, cfg, cc):
    src = ASTSource(fn=kernel, signature=signature(kernel, pointers), constexprs=constexprs)
    with triton.knobs.compilation.scope():
        triton.knobs.compilation.always_compile = True  # a cache hit would skip the compiler we are testing
        return triton.compile(src, target=GPUTarget("cuda", cc, 32),
                              options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))


def check_binary(compiled, cc):
    assert f".target sm_{cc}" in compiled.asm["ptx"]
    assert "mma" in compiled.asm["ptx"]  # tl.dot on tensor cores (fp32 via 3xTF32)
    assert len(compiled.asm["cubin"]) > 1000
    assert compiled.metadata.shared <= TARGETS[cc]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cc", TARGETS)
def test_shrink_compiles(cc, dtype, shape):
    max_len, num_segments, h_in, rank = SHAPES[shape]
    cfg = shrink_config(max_len, num_segments, h_in, rank, dtype)
    t = DTYPES[dtype]
    pointers = dict(x_ptr=f"*{t}", a_ptr=f"*{t}", y_ptr="*fp32" if cfg.split_k > 1 else f"*{t}",
                    starts_ptr="*i32", lens_ptr="*i32", slots_ptr="*i32")
    constexprs = dict(BLOCK_M=cfg.block_m, BLOCK_R=cfg.block_r, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k,
                      UPCAST=False)
    check_binary(compile_for(_sgmv_shrink_kernel, pointers, constexprs, cfg, cc), cc)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cc", TARGETS)
def test_expand_compiles(cc, dtype, shape):
    max_len, _, h_out, rank = SHAPES[shape]
    cfg = expand_config(max_len, h_out, rank, dtype)
    t = DTYPES[dtype]
    pointers = dict(y_ptr=f"*{t}", b_ptr=f"*{t}", out_ptr=f"*{t}", starts_ptr="*i32", lens_ptr="*i32",
                    slots_ptr="*i32")
    constexprs = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_R=cfg.block_r, UPCAST=False)
    check_binary(compile_for(_sgmv_expand_kernel, pointers, constexprs, cfg, cc), cc)


def test_shrink_without_split_k_compiles():
    """The direct-store branch (SPLIT_K == 1, y in the input dtype) that the shapes above do not pick."""
    cfg = shrink_config(64, 256, 1024, 16, torch.bfloat16)
    assert cfg.split_k == 1
    pointers = dict(x_ptr="*bf16", a_ptr="*bf16", y_ptr="*bf16", starts_ptr="*i32", lens_ptr="*i32",
                    slots_ptr="*i32")
    constexprs = dict(BLOCK_M=cfg.block_m, BLOCK_R=cfg.block_r, BLOCK_K=cfg.block_k, SPLIT_K=1, UPCAST=False)
    check_binary(compile_for(_sgmv_shrink_kernel, pointers, constexprs, cfg, 80), 80)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_configs_keep_dot_blocks_at_16_or_more(dtype):
    """tl.dot needs every block dim >= 16 (the interpreter does not check); sweep the host's choices."""
    for max_len in (1, 7, 16, 100, 4096):
        for rank in (1, 8, 16, 17, 64, 100, 128):
            for hidden in (8, 64, 1000, 4096, 14336):
                s = shrink_config(max_len, 3, hidden, rank, dtype)
                e = expand_config(max_len, hidden, rank, dtype)
                assert min(s.block_m, s.block_r, s.block_k, e.block_m, e.block_n, e.block_r) >= 16
                assert s.block_r >= rank and e.block_r >= rank
