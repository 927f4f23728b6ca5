"""Per-slot vectors applied to every token of a step by one gather: (IA)^3 scales, BitFit bias deltas.

Each use of a (fused) linear keeps one table [1 + S, width]: row 0 is the identity (ones for a scale, zeros for
an add), row 1 + s the adapter in slot s, identity where that adapter has nothing. Per step the runtime's view
gives, per decoder layer, the span of rows [lo, hi) holding its tokens and for each of those rows its table row
(0 for tokens of other adapters and for tokens whose AdapterDrop skips this layer). Applying is then one
index_select and one multiply / add over y[lo:hi]; no Python loop over requests.

Worked example: a step of 6 rows, requests (base, 2 rows), (IA3 slot 3, 3 rows), (LoRA slot 0, 1 row):
    lo, hi = 2, 5;  index = [4, 4, 4]          y[2:5] *= table[[4, 4, 4]]
Tables of one runtime all cover every slot its adapters use, since a layer's index serves all its linears.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from adapters.interface import StepLayout


class SlotTable:
    """[1 + num_slots, width] vectors; row 0 = `identity`."""

    def __init__(self, width: int, identity: float, dtype: torch.dtype, device: torch.device):
        self.identity = identity
        self.table = torch.full((1, width), identity, dtype=dtype, device=device)

    @property
    def num_slots(self) -> int:
        return self.table.shape[0] - 1

    def grow(self, num_slots: int) -> None:
        if num_slots > self.num_slots:
            extra = self.table.new_full((num_slots - self.num_slots, self.table.shape[1]), self.identity)
            self.table = torch.cat([self.table, extra])

    def set(self, slot: int, col: int, values: torch.Tensor) -> None:
        self.table[1 + slot, col:col + values.shape[0]] = values.to(self.table.dtype)

    def clear(self, slot: int) -> None:
        if slot < self.num_slots:
            self.table[1 + slot].fill_(self.identity)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        return self.table.index_select(0, index)


@dataclass
class TokenRows:
    """Rows lo .. hi-1 of the step's batch (or of the lm_head's sampled rows) and their table rows [hi - lo]."""
    lo: int
    hi: int
    index: torch.Tensor


@dataclass
class VectorStepView:
    rows: list[TokenRows | None]     # per decoder layer, then [num_layers] for the lm_head (sampled rows)


def vector_step_view(layout: StepLayout, kinds, num_layers: int, device) -> VectorStepView | None:
    """The view for the adapters of `kinds` in this step, or None when no token uses one. AdapterDrop: a
    request with first adapter layer k gets row 0 in layers < k; the lm_head (above every layer) keeps it."""
    token_slots, token_first, sample_slots = layout.slots_of(kinds)
    if all(s is None for s in token_slots):
        return None
    thresholds = sorted({f for s, f in zip(token_slots, token_first) if s is not None})
    by_count: dict[int, TokenRows | None] = {}
    rows: list[TokenRows | None] = []
    for layer in range(num_layers):
        count = sum(1 for t in thresholds if t <= layer)
        if count not in by_count:
            active = [s if s is not None and f <= layer else None for s, f in zip(token_slots, token_first)]
            by_count[count] = _token_rows(active, device)
        rows.append(by_count[count])
    rows.append(_token_rows(sample_slots, device))
    return VectorStepView(rows)


def _token_rows(slots: list[int | None], device) -> TokenRows | None:
    used = [i for i, s in enumerate(slots) if s is not None]
    if not used:
        return None
    lo, hi = used[0], used[-1] + 1
    index = [0 if s is None else 1 + s for s in slots[lo:hi]]
    return TokenRows(lo, hi, torch.tensor(index, dtype=torch.long, device=device))
