"""The CPU fast path (kernels/cpu.py, what `kernels` runs for CPU tensors) against the float32 reference."""
import pytest
import torch

import kernels
from kernels import SegmentMeta, cpu, reference
from tests.kernels.cases import LAYOUTS, TOL, make_inputs, rows_in_no_segment, segment_layout

NUM_SLOTS, H_IN, H_OUT, COL_OFFSET = 6, 72, 40, 7
STRATEGIES = {  # MAX_GATHER_BYTES pinned: "auto" as shipped, "loop" never batches, "batched" batches when short
    "auto": cpu.MAX_GATHER_BYTES, "loop": 0, "batched": 1 << 62}


@pytest.fixture(params=list(STRATEGIES))
def strategy(request, monkeypatch):
    monkeypatch.setattr(cpu, "MAX_GATHER_BYTES", STRATEGIES[request.param])
    return request.param


def test_reference_is_the_per_token_formula():
    """The oracle itself, against an explicit per-token float64 computation."""
    seg = segment_layout("base_interleaved", 30, NUM_SLOTS)
    t = make_inputs(seg, H_IN, H_OUT, 8, NUM_SLOTS, torch.float32)
    slot_of = {r: s for st, n, s in zip(seg.start_list, seg.len_list, seg.slot_list) for r in range(st, st + n)}
    x, a, b = t["x"].double(), t["lora_a"].double(), t["lora_b"].double()
    want_y = torch.stack([a[slot_of[r]] @ x[r] if r in slot_of else torch.zeros(8, dtype=torch.float64)
                          for r in range(seg.num_tokens)])
    want_out = t["out"].double().clone()
    for r, s in slot_of.items():
        want_out[r] += b[s] @ t["y"].double()[r]
    tol = TOL[torch.float32]
    torch.testing.assert_close(reference.sgmv_shrink(t["x"], t["lora_a"], seg).double(), want_y, **tol)
    torch.testing.assert_close(reference.sgmv_expand(t["y"], t["lora_b"], seg, t["out"]).double(), want_out, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rank", [1, 16, 24])
def test_shrink_matches_reference(layout, rank, dtype, strategy):
    seg = segment_layout(layout, 40, NUM_SLOTS)
    t = make_inputs(seg, H_IN, H_OUT, rank, NUM_SLOTS, dtype)
    y = kernels.sgmv_shrink(t["x"], t["lora_a"], seg)
    assert y.shape == (seg.num_tokens, rank) and y.dtype == dtype
    torch.testing.assert_close(y, reference.sgmv_shrink(t["x"], t["lora_a"], seg), **TOL[dtype])
    assert not y[rows_in_no_segment(seg)].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rank", [1, 16, 24])
def test_expand_matches_reference(layout, rank, dtype, strategy):
    seg = segment_layout(layout, 40, NUM_SLOTS)
    t = make_inputs(seg, H_IN, H_OUT, rank, NUM_SLOTS, dtype, extra_cols=COL_OFFSET + 5)
    before = t["out"].clone()
    want = reference.sgmv_expand(t["y"], t["lora_b"], seg, before.clone(), COL_OFFSET)
    got = kernels.sgmv_expand(t["y"], t["lora_b"], seg, t["out"], COL_OFFSET)
    assert got is t["out"]
    torch.testing.assert_close(got, want, **TOL[dtype])
    untouched = rows_in_no_segment(seg)
    assert torch.equal(got[untouched], before[untouched])  # base rows: bit for bit
    assert torch.equal(got[:, :COL_OFFSET], before[:, :COL_OFFSET])  # columns outside the slice too
    assert torch.equal(got[:, COL_OFFSET + H_OUT:], before[:, COL_OFFSET + H_OUT:])


def test_mixed_ranks_share_one_zero_padded_stack():
    """Adapters of rank 2 and 5 padded into an R=8 stack give exactly their own rank-r LoRA delta."""
    torch.manual_seed(0)
    x, out = torch.randn(6, H_IN), torch.zeros(6, H_OUT)
    a2, b2, a5, b5 = torch.randn(2, H_IN), torch.randn(H_OUT, 2), torch.randn(5, H_IN), torch.randn(H_OUT, 5)
    lora_a, lora_b = torch.zeros(2, 8, H_IN), torch.zeros(2, H_OUT, 8)
    lora_a[0, :2], lora_b[0, :, :2], lora_a[1, :5], lora_b[1, :, :5] = a2, b2, a5, b5
    seg = SegmentMeta.from_token_slots([0, 0, 1, None, 1, 0])
    kernels.sgmv_expand(kernels.sgmv_shrink(x, lora_a, seg), lora_b, seg, out)
    want = torch.stack([x[0] @ a2.T @ b2.T, x[1] @ a2.T @ b2.T, x[2] @ a5.T @ b5.T, torch.zeros(H_OUT),
                        x[4] @ a5.T @ b5.T, x[5] @ a2.T @ b2.T])
    torch.testing.assert_close(out, want, **TOL[torch.float32])


def test_plan_worked_example(monkeypatch):
    """The `_Plan` docstring example, and that the plan is built once per SegmentMeta."""
    monkeypatch.setattr(cpu, "SHORT_LEN", 2)
    seg = SegmentMeta.from_token_slots([None, None, 0, 0, 0, 2, 2, None, 1])
    plan = cpu._plan(seg)
    assert (plan.sizes, plan.long, plan.short) == ([2, 3, 0, 2, 1, 1, 0], [(1, 0)], [(3, 2), (5, 1)])
    assert (plan.whole, plan.covers_all) == (None, False)
    assert (plan.num_batched, plan.pad_len, plan.dense_start) == (2, 2, None)
    assert plan.slots.tolist() == [2, 1] and plan.rows.tolist() == [5, 6, 8, 8]
    assert plan.keep.tolist() == [0, 1, 2] and plan.keep_rows.tolist() == [5, 6, 8]
    assert cpu._plan(seg) is plan


@pytest.mark.parametrize("layout, num_batched, dense, padded, slot_view", [
    ("distinct", 40, True, False, False), ("distinct_base", 27, False, False, False),
    ("uniform", 0, None, None, None), ("base_interleaved", 5, False, True, False), ("empty", 3, False, True, False),
    ("ordered_slots", 6, False, True, True)])
def test_layouts_reach_every_batched_path(layout, num_batched, dense, padded, slot_view):
    """Guards the tests above: the layouts exercise the dense, gathered, padded and slot-view batched paths."""
    plan = cpu._build_plan(segment_layout(layout, 40, NUM_SLOTS))
    assert plan.num_batched == num_batched
    if num_batched:
        assert (plan.dense_start is not None, plan.keep is not None) == (dense, padded)
        assert (plan.slot_start is not None) == slot_view


@pytest.mark.parametrize("layout, whole, covers_all", [
    ("identical", 5, True), ("uniform", None, True), ("distinct", None, True), ("distinct_base", None, False)])
def test_plan_shortcuts(layout, whole, covers_all):
    """One adapter over every row skips all views; no base rows lets shrink skip zeroing its output."""
    plan = cpu._build_plan(segment_layout(layout, 40, NUM_SLOTS))
    assert (plan.whole, plan.covers_all) == (whole, covers_all)


def test_strategy_follows_weight_size():
    plan = cpu._build_plan(segment_layout("distinct", 64, 64))
    small, wide = torch.empty(4, 16, 1024), torch.empty(4, 5632, 16)  # 64 x 64 KiB = 4 MiB vs 22 MiB to gather
    assert cpu._split(plan, small) == ([], True)
    loop, batched = cpu._split(plan, wide)
    assert not batched and len(loop) == 64


@pytest.mark.parametrize("op, kwargs, match", [
    ("shrink", dict(x=torch.zeros(5, 8), lora_a=torch.zeros(2, 4, 9)), r"x \(5, 8\) lora_a \(2, 4, 9\)"),
    ("shrink", dict(x=torch.zeros(4, 8), lora_a=torch.zeros(2, 4, 8)), "4 token rows but .* num_tokens=5"),
    ("shrink", dict(x=torch.zeros(5, 8), lora_a=torch.zeros(2, 4, 8, dtype=torch.float16)), "dtype=torch.float32"),
    ("shrink", dict(x=torch.zeros(5, 8), lora_a=torch.zeros(1, 4, 8)), "slot 1 out of range for 1 stacked"),
    ("shrink", dict(x=torch.zeros(5, 8, dtype=torch.int32), lora_a=torch.zeros(2, 4, 8, dtype=torch.int32)),
     "no kernel for dtype=torch.int32"),
    ("expand", dict(y=torch.zeros(5, 4), lora_b=torch.zeros(2, 8, 4), out=torch.zeros(5, 10), col_offset=3),
     r"columns \[3, 11\) do not fit out \(5, 10\)"),
    ("expand", dict(y=torch.zeros(5, 4), lora_b=torch.zeros(2, 8, 3), out=torch.zeros(5, 8), col_offset=0),
     r"lora_b \(2, 8, 3\)"),
    ("expand", dict(y=torch.zeros(5, 4), lora_b=torch.zeros(2, 8, 4), out=torch.zeros(5, 8, dtype=torch.bfloat16),
                    col_offset=0), "out is torch.bfloat16"),
])
def test_bad_arguments_fail_loudly(op, kwargs, match):
    seg = SegmentMeta.from_token_slots([0, 1, None, 1, 0])
    with pytest.raises(ValueError, match=match):
        if op == "shrink":
            kernels.sgmv_shrink(kwargs["x"], kwargs["lora_a"], seg)
        else:
            kernels.sgmv_expand(kwargs["y"], kwargs["lora_b"], seg, kwargs["out"], kwargs["col_offset"])
