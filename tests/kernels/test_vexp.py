"""kernels/vexp.h, the exponential of the C kernels' softmax and SiLU loops: within 1.01 ulp of e^x (float64) over
the float range where e^x is a normal float, vectorised as the kernels build it, and clamped as its comment says."""
from __future__ import annotations

import ctypes
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

KERNELS = Path(__file__).resolve().parents[2] / "kernels"
SOURCE = """
#include "vexp.h"
void vexp_n(const float *x, float *y, int n) {
#pragma omp simd
    for (int i = 0; i < n; i++) y[i] = vexp(x[i]);
}
"""


@pytest.fixture(scope="module")
def vexp_n(tmp_path_factory):
    if shutil.which("cc") is None:
        pytest.skip("needs a C compiler")
    d = tmp_path_factory.mktemp("vexp")
    (d / "v.c").write_text(SOURCE)
    lib = d / "v.so"
    subprocess.run(["cc", "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", f"-I{KERNELS}", "-o", str(lib),
                    str(d / "v.c")], check=True, capture_output=True)
    fn = ctypes.CDLL(str(lib)).vexp_n
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]

    def run(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        y = np.empty_like(x)
        fn(x.ctypes.data, y.ctypes.data, x.size)
        return y
    return run


def ulps(got: np.ndarray, x: np.ndarray) -> np.ndarray:
    exact = np.exp(x.astype(np.float64))
    ref = exact.astype(np.float32)
    spacing = np.spacing(ref).astype(np.float64)
    return np.abs(got.astype(np.float64) - exact) / spacing


def test_within_one_ulp_where_the_result_is_normal(vexp_n):
    rng = np.random.default_rng(0)
    x = np.concatenate([np.linspace(-87.0, 88.5, 1_000_003, dtype=np.float32),
                        rng.uniform(-20, 20, 200_000).astype(np.float32),
                        np.array([0.0, -0.0, 1e-30, -1e-30, 1.0, -1.0, math.log(2)], dtype=np.float32)])
    err = ulps(vexp_n(x), x)
    assert err.max() <= 1.01, (err.max(), x[err.argmax()])
    assert np.median(err) < 0.3


def test_the_clamps_and_nan(vexp_n):
    got = vexp_n(np.array([-1000.0, -88.0, 89.0, 1000.0, np.inf, -np.inf, np.nan], dtype=np.float32))
    tiny = np.finfo(np.float32).tiny
    assert tiny <= got[0] <= 1.01 * tiny and tiny <= got[1] <= 1.01 * tiny and got[5] == got[0]
    assert np.isfinite(got[2:5]).all() and got[2] > 3e38 and got[3] == got[2] == got[4]
    assert np.isnan(got[6])
