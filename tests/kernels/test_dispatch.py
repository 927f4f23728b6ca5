"""One place picks the backend, by device; importing `kernels` compiles nothing and needs no GPU."""
import os
import subprocess
import sys
from pathlib import Path

import torch

import kernels
from kernels import cpu
from kernels.sgmv_expand import sgmv_expand as triton_expand
from kernels.sgmv_shrink import sgmv_shrink as triton_shrink

REPO = Path(__file__).resolve().parents[2]

FRESH_PROCESS = """
import os, sys, torch
import kernels
from kernels.sgmv_shrink import sgmv_shrink
assert os.listdir(os.environ["TRITON_CACHE_DIR"]) == [], "importing kernels compiled something"
seg = kernels.SegmentMeta.from_token_slots([0, None, 1])
try:
    sgmv_shrink(torch.zeros(3, 16), torch.zeros(2, 16, 16), seg)
except ValueError as e:
    assert "need CUDA tensors" in str(e), e
else:
    sys.exit("the Triton op ran on CPU tensors without the interpreter")
print("ok", torch.cuda.is_available())
"""


def test_backend_is_chosen_by_device():
    assert kernels.backend(torch.device("cpu")) is cpu
    assert kernels.backend(torch.device("meta")) is cpu
    cuda = kernels.backend(torch.device("cuda", 0))
    assert (cuda.sgmv_shrink, cuda.sgmv_expand) == (triton_shrink, triton_expand)


def test_import_compiles_nothing_and_triton_ops_refuse_cpu_tensors(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", FRESH_PROCESS], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["ok", "False"]
