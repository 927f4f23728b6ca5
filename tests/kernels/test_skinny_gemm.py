"""kernels/skinny_gemm: the C small-batch GEMM equals F.linear (fp32 to summation order, bf16 to one rounding of
the output), a row's result does not depend on the other rows of its call, and its portable build (no AVX-512)
agrees too."""
from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kernels import skinny_gemm as sk

KERNELS = Path(sk.__file__).parent


def make_case(seed, m, n, k, dtype, bias=True):
    """x as a view with a wider row stride (as the model's slices are), weights of scale ~1/sqrt(k)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k + 9, generator=g)[:, 3:3 + k].to(dtype)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return x, w, b


def reference(x, w, b):
    """F.linear in fp32 on the same (possibly bf16) values: the exact-ish result both paths round."""
    return F.linear(x.float(), w.float(), None if b is None else b.float())


# (rows, outputs, inputs): single rows and groups of four with ragged ends; K not a multiple of a vector
SHAPES = [(1, 37, 50), (1, 64, 576), (2, 9, 33), (3, 40, 64), (5, 13, 100), (16, 48, 96), (7, 130, 1536)]


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_fp32_matches_f_linear(m, n, k, bias):
    x, w, b = make_case(m * n + k, m, n, k, torch.float32, bias)
    assert sk.supports(x, w, b)
    out = sk.skinny_gemm(x, w, b)
    torch.testing.assert_close(out, F.linear(x, w, b), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_bf16_is_the_fp32_result_rounded_once(m, n, k):
    x, w, b = make_case(m + n + k, m, n, k, torch.bfloat16)
    out = sk.skinny_gemm(x, w, b)
    assert out.dtype == torch.bfloat16
    ref = reference(x, w, b)
    # fp32 sums in another order, then one rounding: within one bf16 ulp of the exact result
    torch.testing.assert_close(out.float(), ref, atol=1e-5, rtol=2 ** -8)
    torch.testing.assert_close(out.float(), F.linear(x, w, b).float(), atol=1e-5, rtol=2 ** -7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_rows_result_does_not_depend_on_the_other_rows(dtype):
    x, w, b = make_case(3, 11, 70, 200, dtype)
    together = sk.skinny_gemm(x, w, b)
    for i in range(x.shape[0]):
        assert torch.equal(sk.skinny_gemm(x[i:i + 1], w, b)[0], together[i])
        assert torch.equal(sk.skinny_gemm(x[i:i + 3], w, b)[0], together[i])


def test_linear_sends_few_rows_to_the_kernel_and_more_to_f_linear(monkeypatch):
    calls = []
    real = sk.skinny_gemm
    monkeypatch.setattr(sk, "skinny_gemm", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    for dtype, limit in sk.MAX_ROWS.items():
        calls.clear()
        for m in (1, limit, limit + 1):
            x, w, b = make_case(m, m, 24, 32, dtype)
            torch.testing.assert_close(sk.linear(x, w, b).float(), reference(x, w, b), atol=1e-5, rtol=2 ** -7)
        assert calls == [1, limit]


def test_unsupported_inputs_are_refused():
    x, w, b = make_case(0, 2, 8, 16, torch.float32)
    assert not sk.supports(x.double(), w.double(), b.double())
    assert not sk.supports(x, w.t().contiguous().t(), b)            # weight not contiguous
    assert not sk.supports(x, w.bfloat16(), b)                       # dtypes differ
    assert not sk.supports(x.t(), w[:, :2], None)                    # elements of a row not contiguous


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_portable_build_without_avx512_agrees(tmp_path, dtype):
    """The source's plain-C path (machines without AVX-512), built for x86-64-v3 or the host without -march."""
    flags = ["-march=x86-64-v3"] if _is_x86() else []
    lib = tmp_path / "skinny_portable.so"
    subprocess.run(["cc", "-O3", *flags, "-fopenmp", "-shared", "-fPIC", "-o", str(lib),
                    str(KERNELS / "skinny_gemm.c"), "-lm"], check=True, capture_output=True)
    fn = getattr(ctypes.CDLL(str(lib)), sk.DTYPES[dtype])
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_long, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    for m, n, k in SHAPES:
        x, w, b = make_case(m, m, n, k, dtype)
        y = torch.empty(m, n, dtype=dtype)
        fn(x.data_ptr(), x.stride(0), w.data_ptr(), b.data_ptr(), y.data_ptr(), n, m, n, k, 2)
        rtol = 1e-5 if dtype == torch.float32 else 2 ** -8
        torch.testing.assert_close(y.float(), reference(x, w, b), atol=1e-5, rtol=rtol)


def _is_x86() -> bool:
    import platform
    return platform.machine() in ("x86_64", "AMD64")
