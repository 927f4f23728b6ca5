"""Bottleneck adapters grouped by adapter: per-slot stacks of one sub-layer position and the grouped op.

For one (layer, position) every loaded bottleneck adapter owns slot s of (kernel layout, like LoRA's):
    down  [S, R, hidden]      adapter_down weight, zero-padded to the largest rank R
    up    [S, hidden, R]      adapter_up weight with scaling folded in
and table row s + 1 of the per-token tables (row 0 is the base model: a = e = 0, c = 1, no weights):
    coef    [S+1, 6]          (a_o, a_r, e_o, e_r, c_o, c_r) of adapters.bottleneck.BnMath.coefficients
    down_b  [S+1, R], up_b [S+1, hidden] (scaled), ln_before / ln_after weight and bias [S+1, hidden]
A slot whose adapter has no module here (mh_adapter only, leave_out) keeps zero weights and coefficients
(0, 0, 0, 0, 1, 1): its tokens get o + r exactly.

The op, for the N rows of a step's bottleneck tokens (segments by slot over those rows):
    x = a_o o + a_r r;  x = LN_before(x) where set
    d = act(sgmv_shrink(x, down) + down_b)                       activation per adapter, grouped
    u = sgmv_expand(d, up) + up_b (+ e_o o + e_r r, LN_after where set)
    h = u + c_o o + c_r r
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import kernels
from adapters.bottleneck import ACTIVATIONS, LN_EPS, BnMath, BnModule
from kernels import SegmentMeta
from kernels.sgmv_shrink import MAX_RANK

BASE_COEF = (0.0, 0.0, 0.0, 0.0, 1.0, 1.0)
# The Triton SGMV kernels take ranks <= 128; a bottleneck can be wider (ParBn's reduction_factor 2 on hidden 4096:
# r = 2048), so on CUDA the rank is cut into chunks. The torch path takes any rank.
MAX_KERNEL_RANK = {"cuda": MAX_RANK}


class SublayerStacks:
    """The stacks of one (layer, position); they grow (re-allocated, old rows copied) as slots / ranks arrive."""

    def __init__(self, hidden: int, dtype: torch.dtype, device: torch.device):
        self.hidden, self.dtype, self.device = hidden, dtype, device
        self.num_slots, self.rank = 0, 0
        self.down = self.up = None
        self.coef = self.down_b = self.up_b = None
        self.ln_before: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}   # slot -> (weight, bias)
        self.ln_after: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.lnb_w = self.lnb_b = self.lna_w = self.lna_b = None           # [S+1, hidden] when any is set
        self._grow(1, 1)

    def _new(self, *shape, fill: float = 0.0) -> torch.Tensor:
        return torch.full(shape, fill, dtype=self.dtype, device=self.device)

    def _grow(self, num_slots: int, rank: int) -> None:
        num_slots, rank = max(num_slots, self.num_slots), max(rank, self.rank)
        if num_slots == self.num_slots and rank == self.rank:
            return
        h, s0, r0 = self.hidden, self.num_slots, self.rank
        down, up = self._new(num_slots, rank, h), self._new(num_slots, h, rank)
        coef = self._new(num_slots + 1, 6)
        coef[:] = torch.tensor(BASE_COEF, dtype=self.dtype)
        down_b, up_b = self._new(num_slots + 1, rank), self._new(num_slots + 1, h)
        if s0:
            down[:s0, :r0], up[:s0, :, :r0] = self.down, self.up
            coef[:s0 + 1], down_b[:s0 + 1, :r0], up_b[:s0 + 1] = self.coef, self.down_b, self.up_b
        self.down, self.up, self.coef, self.down_b, self.up_b = down, up, coef, down_b, up_b
        self.num_slots, self.rank = num_slots, rank
        self._norm_tables()

    def set_slot(self, slot: int, module: BnModule | None, math: BnMath, num_slots: int) -> None:
        """Install one adapter's module of this position into `slot` (None: it has none here)."""
        self.clear_slot(slot)
        self._grow(max(num_slots, slot + 1), module.rank if module is not None else 1)
        if module is None:
            return
        r, row = module.rank, slot + 1
        self.down[slot, :r] = module.down_w.to(self.dtype)
        self.up[slot, :, :r] = module.up_w.to(self.dtype)
        self.coef[row] = torch.tensor(math.coefficients, dtype=self.dtype)
        self.down_b[row, :r] = module.down_b.to(self.dtype)
        self.up_b[row] = module.up_b.to(self.dtype)
        if module.ln_before is not None:
            self.ln_before[slot] = module.ln_before
        if module.ln_after is not None:
            self.ln_after[slot] = module.ln_after
        self._norm_tables()

    def clear_slot(self, slot: int) -> None:
        if slot < self.num_slots:
            self.down[slot].zero_()
            self.up[slot].zero_()
            self.coef[slot + 1] = torch.tensor(BASE_COEF, dtype=self.dtype)
            self.down_b[slot + 1].zero_()
            self.up_b[slot + 1].zero_()
        had_norm = [norms.pop(slot, None) for norms in (self.ln_before, self.ln_after)]
        if any(n is not None for n in had_norm):
            self._norm_tables()

    def _norm_tables(self) -> None:
        """[S+1, hidden] weight / bias tables of the adapters' own LayerNorms (row of a slot without one: unused)."""
        for attr, norms in (("lnb", self.ln_before), ("lna", self.ln_after)):
            w = b = None
            if norms:
                w, b = self._new(self.num_slots + 1, self.hidden, fill=1.0), self._new(self.num_slots + 1, self.hidden)
                for slot, (nw, nb) in norms.items():
                    w[slot + 1], b[slot + 1] = nw.to(self.dtype), nb.to(self.dtype)
            setattr(self, f"{attr}_w", w)
            setattr(self, f"{attr}_b", b)


@dataclass(eq=False)
class TokenGroup:
    """The bottleneck tokens of one step that are active in a layer (AdapterDrop leaves some out), built once."""
    rows: torch.Tensor | slice            # their flat rows: a slice when contiguous
    table_index: torch.Tensor             # [N] long: slot + 1 per row
    seg: SegmentMeta                      # segments by slot over the N compacted rows
    slots: list[int]                      # distinct slots present
    by_activation: dict[str, torch.Tensor | None]   # activation -> [N, 1] bool rows using it (None: all rows)
    _masks: dict

    @classmethod
    def build(cls, token_rows: list[int], token_slots: list[int], activation_of: dict[int, str],
              device: torch.device) -> TokenGroup:
        n = len(token_rows)
        first = token_rows[0]
        contiguous = token_rows == list(range(first, first + n))
        rows = slice(first, first + n) if contiguous else torch.tensor(token_rows, dtype=torch.long, device=device)
        table_index = torch.tensor([s + 1 for s in token_slots], dtype=torch.long, device=device)
        acts = [activation_of[s] for s in token_slots]
        names = sorted(set(acts))
        if len(names) == 1:
            by_act = {names[0]: None}
        else:
            by_act = {a: torch.tensor([x == a for x in acts], device=device)[:, None] for a in names}
        return cls(rows, table_index, SegmentMeta.from_token_slots(token_slots, device), sorted(set(token_slots)),
                   by_act, {})

    def slot_mask(self, slots: set[int]) -> torch.Tensor | None:
        """[N, 1] bool: rows whose slot is in `slots` (None when that is every row); memoised for the step."""
        key = frozenset(s for s in self.slots if s in slots)
        if len(key) == len(self.slots):
            return None
        if key not in self._masks:
            idx = torch.tensor(sorted(key), dtype=torch.long, device=self.table_index.device) + 1
            self._masks[key] = torch.isin(self.table_index, idx)[:, None]
        return self._masks[key]


def _layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    y = F.layer_norm(x, x.shape[-1:], eps=LN_EPS) * w + b
    return y if mask is None else torch.where(mask, y, x)


def grouped_sublayer(o: torch.Tensor, r: torch.Tensor, group: TokenGroup, stacks: SublayerStacks) -> torch.Tensor:
    """The hidden state after the sub-layer for the group's rows: o, r [N, hidden] (its rows of the sub-layer
    output and of the residual stream entering it) -> h [N, hidden]. See the module docstring."""
    idx = group.table_index
    coef = stacks.coef[idx]                                                    # [N, 6]
    x = coef[:, 0:1] * o + coef[:, 1:2] * r
    if stacks.ln_before:
        x = _layer_norm(x, stacks.lnb_w[idx], stacks.lnb_b[idx], group.slot_mask(set(stacks.ln_before)))
    d = _shrink(x, stacks.down, group.seg) + stacks.down_b[idx]
    if len(group.by_activation) == 1:
        d = ACTIVATIONS[next(iter(group.by_activation))](d)
    else:
        d = sum(torch.where(mask, ACTIVATIONS[name](d), 0.0) for name, mask in group.by_activation.items())
    if stacks.ln_after:
        u = stacks.up_b[idx] + coef[:, 2:3] * o + coef[:, 3:4] * r
        _expand(d, stacks.up, group.seg, u)
        u = _layer_norm(u, stacks.lna_w[idx], stacks.lna_b[idx], group.slot_mask(set(stacks.ln_after)))
        return u + coef[:, 4:5] * o + coef[:, 5:6] * r
    h = coef[:, 4:5] * o + coef[:, 5:6] * r + stacks.up_b[idx]
    return _expand(d, stacks.up, group.seg, h)


def _chunks(rank: int, device: torch.device) -> list[slice]:
    step = MAX_KERNEL_RANK.get(device.type) or rank
    return [slice(c, min(c + step, rank)) for c in range(0, rank, step)]


def _shrink(x: torch.Tensor, down: torch.Tensor, seg: SegmentMeta) -> torch.Tensor:
    parts = [kernels.sgmv_shrink(x, down[:, c], seg) for c in _chunks(down.shape[1], x.device)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _expand(d: torch.Tensor, up: torch.Tensor, seg: SegmentMeta, out: torch.Tensor) -> torch.Tensor:
    for c in _chunks(up.shape[2], d.device):
        kernels.sgmv_expand(d[:, c], up[:, :, c], seg, out)
    return out
