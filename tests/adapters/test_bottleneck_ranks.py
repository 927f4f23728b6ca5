"""Bottleneck adapters of very different ranks in one batch: each row equals its adapter run alone (and the literal
AdapterHub reference), and a narrow adapter's rows never go through the wide adapter's rank (the shapes the grouped
op hands the SGMV kernels, recorded at the `kernels` seam)."""
from __future__ import annotations

import pytest
import torch

import kernels
from adapters import bottleneck_stacks
from adapters.bottleneck import MLP, BnMath, BottleneckAdapter, reference_sublayer
from kernels.shapes import rank_class
from tests.adapters.bottleneck_cases import HIDDEN, LAYER, make_adapters, mixed_case, module, run, stacks_of


@pytest.mark.parametrize("kernel_rank", [None, 128, 7])     # torch path whole; chunked as on CUDA; odd chunks
def test_mixed_ranks_equal_each_adapter_alone(monkeypatch, kernel_rank):
    if kernel_rank:
        monkeypatch.setitem(bottleneck_stacks.MAX_KERNEL_RANK, "cpu", kernel_rank)
    adapters, token_slots, o, r = mixed_case(torch.float32)
    stacks = stacks_of(dict(enumerate(adapters)))
    assert sorted(stacks.buckets) == [16, 64, 256] and stacks.buckets[16].down.shape == (2, 16, HIDDEN)
    mixed = run(stacks, token_slots, adapters, o, r)
    for slot, adapter in enumerate(adapters):
        rows = [i for i, s in enumerate(token_slots) if s == slot]
        alone = run(stacks_of({slot: adapter}), [slot] * len(rows), adapters, o[rows], r[rows])
        torch.testing.assert_close(mixed[rows], alone, atol=1e-6, rtol=1e-6, msg=adapter.name)
        want = reference_sublayer(o[rows], r[rows], adapter, LAYER, MLP)
        torch.testing.assert_close(mixed[rows], want, atol=1e-5, rtol=1e-5, msg=adapter.name)


def test_removing_the_wide_adapters_frees_their_bucket_and_keeps_the_rest():
    adapters = make_adapters()
    stacks = stacks_of(dict(enumerate(adapters)))
    token_slots = [1, 1, 2, 4, 4, 2]
    g = torch.Generator().manual_seed(2)
    o, r = torch.randn(6, HIDDEN, generator=g), torch.randn(6, HIDDEN, generator=g)
    before = run(stacks, token_slots, adapters, o, r)
    stacks.clear_slot(0)
    assert 256 in stacks.buckets
    stacks.clear_slot(5)
    assert sorted(stacks.buckets) == [16, 64] and stacks.rank == 64
    torch.testing.assert_close(run(stacks, token_slots, adapters, o, r), before, atol=0, rtol=0)
    stacks.clear_slot(1)
    stacks.set_slot(3, adapters[1].modules[(LAYER, MLP)], adapters[1].math, 6)    # reuses slot 1's freed index
    assert stacks.place[3] == (16, 0) and stacks.buckets[16].slot_at == [3, 4]
    moved = run(stacks, [3, 3, 2, 4, 4, 2], {**dict(enumerate(adapters)), 3: adapters[1]}, o, r)
    torch.testing.assert_close(moved, before, atol=0, rtol=0)


def record_kernels(monkeypatch) -> list[tuple[str, tuple, tuple]]:
    """Every SGMV call of the grouped op: (op, shape of the rows it multiplies, shape of the weight stack)."""
    calls = []
    shrink, expand = kernels.sgmv_shrink, kernels.sgmv_expand

    def rec_shrink(x, w, seg):
        calls.append(("shrink", tuple(x.shape), tuple(w.shape)))
        return shrink(x, w, seg)

    def rec_expand(y, w, seg, out, col_offset=0):
        calls.append(("expand", tuple(y.shape), tuple(w.shape)))
        return expand(y, w, seg, out, col_offset)
    monkeypatch.setattr(kernels, "sgmv_shrink", rec_shrink)
    monkeypatch.setattr(kernels, "sgmv_expand", rec_expand)
    return calls


def test_a_narrow_adapter_does_not_pay_for_a_wide_one(monkeypatch):
    """r 8 adapters beside an r 300 one (rank class 512): the narrow rows are multiplied at width 16 only, the wide
    rows at 512 only; a step without the wide adapter's tokens runs no 512-wide op at all."""
    g = torch.Generator().manual_seed(3)
    narrow, wide = BnMath(non_linearity="relu"), BnMath(is_parallel=True, non_linearity="relu")
    adapters = {0: BottleneckAdapter("/n0", "n0", narrow, {(LAYER, MLP): module(8, g)}),
                1: BottleneckAdapter("/w", "w", wide, {(LAYER, MLP): module(300, g)}),
                2: BottleneckAdapter("/n2", "n2", narrow, {(LAYER, MLP): module(8, g)})}
    assert (rank_class(8), rank_class(300)) == (16, 512)
    stacks = stacks_of(adapters)
    calls = record_kernels(monkeypatch)
    o, r = torch.randn(7, HIDDEN, generator=g), torch.randn(7, HIDDEN, generator=g)
    token_slots = [0, 1, 1, 2, 2, 0, 1]
    mixed = run(stacks, token_slots, adapters, o, r)
    assert sorted(calls) == sorted([("shrink", (4, HIDDEN), (2, 16, HIDDEN)), ("expand", (4, 16), (2, HIDDEN, 16)),
                                    ("shrink", (3, HIDDEN), (1, 512, HIDDEN)), ("expand", (3, 512), (1, HIDDEN, 512))])
    for slot, a in adapters.items():
        rows = [i for i, s in enumerate(token_slots) if s == slot]
        torch.testing.assert_close(mixed[rows], reference_sublayer(o[rows], r[rows], a, LAYER, MLP),
                                   atol=1e-5, rtol=1e-5)
    calls.clear()
    run(stacks, [0, 0, 2, 0], adapters, o[:4], r[:4])
    assert calls == [("shrink", (4, HIDDEN), (2, 16, HIDDEN)), ("expand", (4, 16), (2, HIDDEN, 16))]
    calls.clear()
    monkeypatch.setitem(bottleneck_stacks.MAX_KERNEL_RANK, "cpu", 128)     # as on CUDA: the wide one in chunks
    run(stacks, token_slots, adapters, o, r)
    assert [c for c in calls if c[0] == "shrink"] == [("shrink", (4, HIDDEN), (2, 16, HIDDEN))] + \
        [("shrink", (3, HIDDEN), (1, 128, HIDDEN))] * 4
