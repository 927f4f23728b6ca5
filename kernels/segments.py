"""Per-step token→adapter segments, built once per engine step and passed to every LoRA layer.

Worked example (9 flat tokens, adapter slots per token, `None` = base model only):

    token_slots = [None, None, 0, 0, 0, 2, 2, None, 1]
    token index     0     1    2  3  4  5  6    7   8

    consecutive equal slots form one segment; base tokens belong to none:
    starts = [2, 5, 8]      first token row of each segment
    lens   = [3, 2, 1]      tokens in each segment
    slots  = [0, 2, 1]      adapter slot (index into the stacked lora_a / lora_b) of each segment
    max_len = 3, num_tokens = 9; rows 0, 1 and 7 are in no segment: the LoRA ops skip them.

Segments are sorted by start and never overlap; a segment may be empty (len 0). The same slot may
appear in several segments (e.g. decode tokens of different sequences using one adapter).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Sequence

import torch


@dataclass(frozen=True, eq=False)
class SegmentMeta:
    starts: torch.Tensor  # [num_segments] int32 on the compute device
    lens: torch.Tensor  # [num_segments] int32 on the compute device
    slots: torch.Tensor  # [num_segments] int32 on the compute device
    start_list: list[int]  # the same three as python lists, for host-side launch logic and the CPU path
    len_list: list[int]
    slot_list: list[int]
    num_tokens: int  # T: rows of the flat token batch, including rows in no segment
    max_len: int  # longest segment (0 when there are none)
    # Per-step memo for index tensors a backend derives from these segments (the CPU path stores its
    # batching plan here), so every layer of the step reuses them.
    derived: dict = field(default_factory=dict, repr=False)

    @property
    def num_segments(self) -> int:
        return len(self.start_list)

    @functools.cached_property
    def max_slot(self) -> int | None:
        return max(self.slot_list, default=None)

    @classmethod
    def from_segments(cls, starts: Sequence[int], lens: Sequence[int], slots: Sequence[int],
                      num_tokens: int, device: torch.device | str = "cpu") -> SegmentMeta:
        """Segments given explicitly; validated (sorted, in range, non-overlapping, slots >= 0)."""
        starts, lens, slots = [int(s) for s in starts], [int(n) for n in lens], [int(s) for s in slots]
        if not len(starts) == len(lens) == len(slots):
            raise ValueError(f"segment lists differ in length: starts={len(starts)} lens={len(lens)} "
                             f"slots={len(slots)}")
        end = 0
        for i, (start, n, slot) in enumerate(zip(starts, lens, slots)):
            if start < end or n < 0 or start + n > num_tokens or slot < 0:
                raise ValueError(f"bad segment {i}: start={start} len={n} slot={slot} (previous segment "
                                 f"ends at {end}, num_tokens={num_tokens})")
            end = start + n
        # One host→device copy for the three int32 rows.
        packed = torch.tensor([starts, lens, slots], dtype=torch.int32).reshape(3, len(starts)).to(device)
        return cls(starts=packed[0], lens=packed[1], slots=packed[2], start_list=starts, len_list=lens,
                   slot_list=slots, num_tokens=num_tokens, max_len=max(lens, default=0))

    @classmethod
    def from_token_slots(cls, token_slots: Sequence[int | None], device: torch.device | str = "cpu",
                         runs: Sequence[int] | None = None) -> SegmentMeta:
        """One segment per run of equal consecutive slots; `None` tokens are in no segment. `runs` (per token):
        consecutive tokens share a segment only if their runs are equal too (e.g. to keep a long prefill chunk
        apart from the decode rows of the same adapter)."""
        starts, lens, slots = [], [], []
        for i, slot in enumerate(token_slots):
            if slot is None:
                continue
            joins = slots and slots[-1] == slot and starts[-1] + lens[-1] == i
            if joins and (runs is None or runs[i] == runs[i - 1]):
                lens[-1] += 1
            else:
                starts.append(i)
                lens.append(1)
                slots.append(slot)
        return cls.from_segments(starts, lens, slots, len(token_slots), device)
