"""Triton SGMV kernels run in Triton's interpreter (in a subprocess, see triton_interpret_worker.py) vs the
float32 reference: every layout kind that matters for masking, split-K, padded ranks, fp32/fp16/bf16."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import reference
from kernels.sgmv_expand import expand_config
from kernels.sgmv_shrink import shrink_config
from tests.kernels.cases import TOL, rows_in_no_segment
from tests.kernels.triton_interpret_worker import CASES, COL_OFFSET, H_OUT, case_id, case_inputs

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """{case id: {"y": shrink output, "out": expand output}} computed by the interpreted kernels."""
    path = tmp_path_factory.mktemp("interpret") / "results.pt"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "tests.kernels.triton_interpret_worker", str(path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(path)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_interpreted_shrink(interpreted, case):
    seg, t = case_inputs(case)
    y = interpreted[case_id(case)]["y"]
    assert y.dtype == t["x"].dtype and y.shape == (seg.num_tokens, t["lora_a"].shape[1])
    torch.testing.assert_close(y, reference.sgmv_shrink(t["x"], t["lora_a"], seg), **TOL[y.dtype])
    assert not y[rows_in_no_segment(seg)].any()


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_interpreted_expand(interpreted, case):
    seg, t = case_inputs(case)
    out = interpreted[case_id(case)]["out"]
    before = t["out"]
    torch.testing.assert_close(out, reference.sgmv_expand(t["y"], t["lora_b"], seg, before.clone(), COL_OFFSET),
                               **TOL[out.dtype])
    untouched = rows_in_no_segment(seg)
    assert torch.equal(out[untouched], before[untouched])
    assert torch.equal(out[:, :COL_OFFSET], before[:, :COL_OFFSET])
    assert torch.equal(out[:, COL_OFFSET + H_OUT:], before[:, COL_OFFSET + H_OUT:])


def test_cases_cover_both_shrink_stores_and_several_tiles():
    """Guards the cases above: split-K (atomics into fp32) and direct stores, several M and N tiles."""
    configs = [(shrink_config(seg.max_len, seg.num_segments, t["x"].shape[1], t["lora_a"].shape[1], t["x"].dtype),
                 expand_config(seg.max_len, H_OUT, t["lora_b"].shape[2], t["x"].dtype))
               for seg, t in map(case_inputs, CASES)]
    assert {s.split_k > 1 for s, _ in configs} == {True, False}
    assert {s.block_m for s, _ in configs} >= {16, 32} and {s.block_r for s, _ in configs} == {16, 64}
    assert all(H_OUT > e.block_n for _, e in configs)
