"""The grouped bottleneck op with the Triton SGMV kernels (in Triton's interpreter, in a subprocess: see
bottleneck_interpret_worker.py) vs the same op on the torch path: several slots in three rank buckets (16, 64, 256),
the 256-wide one cut into chunks of the kernels' MAX_RANK as on CUDA, every math option; fp32 and bf16."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adapters.bottleneck import MLP, reference_sublayer
from kernels.sgmv_shrink import MAX_RANK
from tests.adapters.bottleneck_cases import HIDDEN, LAYER, mixed_case, run, stacks_of
from tests.kernels.bottleneck_interpret_worker import DTYPES

REPO = Path(__file__).resolve().parents[2]
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=4e-2, rtol=2e-2)}  # bf16: ~2 ulps after LN


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    path = tmp_path_factory.mktemp("bn_interpret") / "results.pt"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "tests.kernels.bottleneck_interpret_worker", str(path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(path)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_grouped_op_equals_torch_path(interpreted, dtype):
    adapters, token_slots, o, r = mixed_case(dtype)
    got = interpreted[str(dtype)]["h"]
    want = run(stacks_of(dict(enumerate(adapters)), dtype), token_slots, adapters, o, r)
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])
    for slot, adapter in enumerate(adapters):            # and the literal AdapterHub math, on the same inputs
        rows = [i for i, s in enumerate(token_slots) if s == slot]
        ref = reference_sublayer(o[rows], r[rows], adapter, LAYER, MLP)
        torch.testing.assert_close(got[rows].float(), ref, **TOL[dtype], msg=adapter.name)


def test_every_bucket_ran_on_the_kernels_in_rank_chunks(interpreted):
    """Buckets 16 and 64 in one launch each, bucket 256 in two MAX_RANK chunks; each on its own rows only."""
    adapters, token_slots, _, _ = mixed_case(torch.float32)
    rows_in = {w: sum(1 for s in token_slots if (m := adapters[s].modules.get((LAYER, MLP))) is not None
                      and {3: 16, 16: 16, 40: 64, 130: 256, 200: 256}[m.rank] == w) for w in (16, 64, 256)}
    shrinks = [c for c in interpreted[str(torch.float32)]["calls"] if c[0] == "shrink"]
    assert MAX_RANK == 128 and shrinks == [("shrink", (rows_in[16], HIDDEN), (2, 16, HIDDEN)),
                                           ("shrink", (rows_in[64], HIDDEN), (1, 64, HIDDEN)),
                                           ("shrink", (rows_in[256], HIDDEN), (2, 128, HIDDEN)),
                                           ("shrink", (rows_in[256], HIDDEN), (2, 128, HIDDEN))]
    assert len(interpreted[str(torch.float32)]["calls"]) == 8
