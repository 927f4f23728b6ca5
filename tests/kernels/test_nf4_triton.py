"""The Triton NF4 dequantize-matmul: in Triton's interpreter (a subprocess, see nf4_interpret_worker.py) vs the
float32 reference, and compiled ahead of time for sm_80 / sm_90 for the tiles the host function picks."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton

from kernels import reference
from kernels.nf4 import _nf4_matmul_kernel, matmul_config
from tests.kernels.cases import TOL
from tests.kernels.nf4_interpret_worker import CASES, case_id, case_inputs
from tests.kernels.test_triton_aot import DTYPES, check_binary, compile_for

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    path = tmp_path_factory.mktemp("nf4_interpret") / "results.pt"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "tests.kernels.nf4_interpret_worker", str(path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(path)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_interpreted_nf4_matmul(interpreted, case):
    x, parts, bias = case_inputs(case)
    y = interpreted[case_id(case)]
    want = torch.cat([reference.nf4_linear(x, p) for p in parts], dim=1).float()
    if bias is not None:
        want += bias.float()
    assert y.dtype == x.dtype and y.shape == want.shape
    torch.testing.assert_close(y, want.to(x.dtype), **TOL[x.dtype])


@pytest.mark.skipif(not isinstance(_nf4_matmul_kernel, triton.runtime.JITFunction),
                    reason="TRITON_INTERPRET=1 is set for the whole session: no compilable kernels in-process")
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "double"])
@pytest.mark.parametrize("tokens", [1, 256], ids=["decode", "prefill"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cc", [80, 90])
def test_nf4_matmul_compiles(cc, dtype, tokens, nested):
    cfg = matmul_config(tokens, 4096, 4096)
    t = DTYPES[dtype]
    pointers = dict(x_ptr=f"*{t}", packed_ptr="*u8", absmax_ptr="*u8" if nested else "*fp32", nested_ptr="*fp32",
                    offset_ptr="*fp32", code_ptr="*fp32", dyn_ptr="*fp32", bias_ptr=f"*{t}", y_ptr=f"*{t}")
    constexprs = dict(BLOCKSIZE=64, NESTED_BLOCK=256, NESTED=nested, HAS_BIAS=True, BLOCK_M=cfg.block_m,
                      BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, UPCAST=False)
    check_binary(compile_for(_nf4_matmul_kernel, pointers, constexprs, cfg, cc), cc)
