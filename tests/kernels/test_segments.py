"""SegmentMeta: the worked example from its docstring, merging rules, validation."""
import pytest
import torch

from kernels import SegmentMeta


def test_worked_example():
    seg = SegmentMeta.from_token_slots([None, None, 0, 0, 0, 2, 2, None, 1])
    assert (seg.start_list, seg.len_list, seg.slot_list) == ([2, 5, 8], [3, 2, 1], [0, 2, 1])
    assert (seg.num_tokens, seg.max_len, seg.num_segments, seg.max_slot) == (9, 3, 3, 2)
    for tensor, values in ((seg.starts, [2, 5, 8]), (seg.lens, [3, 2, 1]), (seg.slots, [0, 2, 1])):
        assert tensor.dtype == torch.int32 and tensor.device.type == "cpu" and tensor.tolist() == values


def test_equal_slots_split_by_a_base_token_are_two_segments():
    seg = SegmentMeta.from_token_slots([3, None, 3, 3, 1, 3])
    assert (seg.start_list, seg.len_list, seg.slot_list) == ([0, 2, 4, 5], [1, 2, 1, 1], [3, 3, 1, 3])


def test_runs_split_equal_slots():
    """Slot 0: two decode rows (run -1), a 3-row prefill chunk (run 7), another decode row (run -1)."""
    seg = SegmentMeta.from_token_slots([0, 0, 0, 0, 0, 0, 2], runs=[-1, -1, 7, 7, 7, -1, -1])
    assert (seg.start_list, seg.len_list, seg.slot_list) == ([0, 2, 5, 6], [2, 3, 1, 1], [0, 0, 0, 2])


@pytest.mark.parametrize("token_slots", [[], [None, None]])
def test_no_segments(token_slots):
    seg = SegmentMeta.from_token_slots(token_slots)
    assert (seg.num_segments, seg.max_len, seg.max_slot, seg.num_tokens) == (0, 0, None, len(token_slots))
    assert seg.starts.shape == (0,)


def test_from_segments_keeps_empty_and_back_to_back_segments():
    seg = SegmentMeta.from_segments([0, 2, 2, 5], [2, 0, 3, 1], [1, 1, 1, 0], num_tokens=7)
    assert seg.len_list == [2, 0, 3, 1] and seg.max_len == 3 and seg.lens.tolist() == [2, 0, 3, 1]


@pytest.mark.parametrize("starts, lens, slots, num_tokens, match", [
    ([0, 2], [3, 1], [0, 1], 5, "previous segment ends at 3"),  # overlap
    ([3, 0], [1, 1], [0, 1], 5, "start=0"),  # unsorted
    ([4], [2], [0], 5, "num_tokens=5"),  # past the end
    ([0], [-1], [0], 5, "len=-1"),
    ([0], [1], [-2], 5, "slot=-2"),
    ([0, 1], [1], [0, 0], 5, "starts=2 lens=1 slots=2"),
])
def test_from_segments_rejects_bad_segments(starts, lens, slots, num_tokens, match):
    with pytest.raises(ValueError, match=match):
        SegmentMeta.from_segments(starts, lens, slots, num_tokens)
