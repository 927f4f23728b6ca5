"""Bottleneck adapters grouped by adapter: per-slot stacks of one sub-layer position and the grouped op.

For one (layer, position) the weights of every loaded bottleneck adapter with a module there live in the rank
bucket of its rank class w (kernels.shapes.rank_class: the next power of two, at least 16), at a local index i
of that bucket (kernel layout, like LoRA's):
    down    [S_w, w, hidden]  adapter_down weight, zero-padded to w
    up      [S_w, hidden, w]  adapter_up weight with scaling folded in
    down_b  [S_w, w]
so a request pays for its own adapter's rank class, not for the widest adapter loaded. Every slot s in use has
row s + 1 of the per-token tables (row 0 is the base model: a = e = 0, c = 1, no weights):
    coef    [S+1, 6]          (a_o, a_r, e_o, e_r, c_o, c_r) of adapters.bottleneck.BnMath.coefficients
    up_b    [S+1, hidden] (scaled), ln_before / ln_after weight and bias [S+1, hidden]
A slot whose adapter has no module here (mh_adapter only, leave_out) is in no bucket and keeps coefficients
(0, 0, 0, 0, 1, 1): its tokens get o + r exactly.

The op, for the N rows of a step's bottleneck tokens (segments by slot over those rows):
    x = a_o o + a_r r;  x = LN_before(x) where set
    per bucket w present in the step, over its rows (segments by local index):
        d = act(sgmv_shrink(x, down_w) + down_b_w)                 activation per adapter, grouped
        u += sgmv_expand(d, up_w)           where u = up_b (+ e_o o + e_r r, LN_after where set)
    h = u + c_o o + c_r r
With one bucket present its segments run over all N rows (rows of slots without a module are in none); with
several, each bucket's rows are gathered (a view when contiguous) so no op sees another bucket's rows.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import kernels
from adapters.bottleneck import ACTIVATIONS, LN_EPS, BnMath, BnModule
from kernels import SegmentMeta
from kernels.shapes import rank_class
from kernels.sgmv_shrink import MAX_RANK

BASE_COEF = (0.0, 0.0, 0.0, 0.0, 1.0, 1.0)
# The Triton SGMV kernels take ranks <= 128; a bottleneck can be wider (ParBn's reduction_factor 2 on hidden 4096:
# r = 2048), so on CUDA the rank is cut into chunks. The torch path takes any rank.
MAX_KERNEL_RANK = {"cuda": MAX_RANK}


class RankBucket:
    """The weights of the modules of one rank class `width`; local index i holds slot `slot_at[i]` (None: free,
    zero weights). Grows (re-allocated, old rows copied) one index at a time; freed indices are reused."""

    def __init__(self, width: int, hidden: int, dtype: torch.dtype, device: torch.device):
        self.width = width
        self.slot_at: list[int | None] = []
        self.down = torch.zeros(0, width, hidden, dtype=dtype, device=device)
        self.up = torch.zeros(0, hidden, width, dtype=dtype, device=device)
        self.down_b = torch.zeros(0, width, dtype=dtype, device=device)

    @property
    def is_empty(self) -> bool:
        return all(s is None for s in self.slot_at)

    def add(self, slot: int, module: BnModule) -> int:
        """Store `module` for `slot` → its local index."""
        if None in self.slot_at:
            local = self.slot_at.index(None)
        else:
            local = len(self.slot_at)
            self.slot_at.append(None)
            self.down, self.up, self.down_b = (torch.cat([t, t.new_zeros(1, *t.shape[1:])])
                                               for t in (self.down, self.up, self.down_b))
        r, dtype = module.rank, self.down.dtype
        self.down[local, :r] = module.down_w.to(dtype)
        self.up[local, :, :r] = module.up_w.to(dtype)
        self.down_b[local, :r] = module.down_b.to(dtype)
        self.slot_at[local] = slot
        return local

    def remove(self, local: int) -> None:
        for t in (self.down, self.up, self.down_b):
            t[local].zero_()
        self.slot_at[local] = None


class SublayerStacks:
    """The stacks of one (layer, position): rank buckets and the per-token tables; they grow as slots arrive."""

    def __init__(self, hidden: int, dtype: torch.dtype, device: torch.device):
        self.hidden, self.dtype, self.device = hidden, dtype, device
        self.num_slots = 0
        self.buckets: dict[int, RankBucket] = {}                            # rank class -> its bucket
        self.place: dict[int, tuple[int, int]] = {}                         # slot -> (rank class, local index)
        self.coef = self.up_b = None
        self.ln_before: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}   # slot -> (weight, bias)
        self.ln_after: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.lnb_w = self.lnb_b = self.lna_w = self.lna_b = None           # [S+1, hidden] when any is set
        self._grow(1)

    @property
    def rank(self) -> int:
        """The widest rank class stored (0: none)."""
        return max(self.buckets, default=0)

    def _new(self, *shape, fill: float = 0.0) -> torch.Tensor:
        return torch.full(shape, fill, dtype=self.dtype, device=self.device)

    def _grow(self, num_slots: int) -> None:
        if num_slots <= self.num_slots:
            return
        s0 = self.num_slots
        coef = self._new(num_slots + 1, 6)
        coef[:] = torch.tensor(BASE_COEF, dtype=self.dtype)
        up_b = self._new(num_slots + 1, self.hidden)
        if s0:
            coef[:s0 + 1], up_b[:s0 + 1] = self.coef, self.up_b
        self.coef, self.up_b, self.num_slots = coef, up_b, num_slots
        self._norm_tables()

    def set_slot(self, slot: int, module: BnModule | None, math: BnMath, num_slots: int) -> None:
        """Install one adapter's module of this position into `slot` (None: it has none here)."""
        self.clear_slot(slot)
        self._grow(max(num_slots, slot + 1))
        if module is None:
            return
        width, row = rank_class(module.rank), slot + 1
        if width not in self.buckets:
            self.buckets[width] = RankBucket(width, self.hidden, self.dtype, self.device)
        self.place[slot] = (width, self.buckets[width].add(slot, module))
        self.coef[row] = torch.tensor(math.coefficients, dtype=self.dtype)
        self.up_b[row] = module.up_b.to(self.dtype)
        if module.ln_before is not None:
            self.ln_before[slot] = module.ln_before
        if module.ln_after is not None:
            self.ln_after[slot] = module.ln_after
        self._norm_tables()

    def clear_slot(self, slot: int) -> None:
        if slot in self.place:
            width, local = self.place.pop(slot)
            self.buckets[width].remove(local)
            if self.buckets[width].is_empty:          # a removed wide adapter leaves no wide stack behind
                del self.buckets[width]
        if slot < self.num_slots:
            self.coef[slot + 1] = torch.tensor(BASE_COEF, dtype=self.dtype)
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
    activation_of: dict[int, str] = field(default_factory=dict)    # slot -> its activation
    _parts: dict = field(default_factory=dict)     # bucket layout of the group's slots -> [_BucketRows], memoised

    @classmethod
    def build(cls, token_rows: list[int], token_slots: list[int], activation_of: dict[int, str],
              device: torch.device) -> TokenGroup:
        n = len(token_rows)
        first = token_rows[0]
        contiguous = token_rows == list(range(first, first + n))
        rows = slice(first, first + n) if contiguous else torch.tensor(token_rows, dtype=torch.long, device=device)
        table_index = torch.tensor([s + 1 for s in token_slots], dtype=torch.long, device=device)
        slots = sorted(set(token_slots))
        return cls(rows, table_index, SegmentMeta.from_token_slots(token_slots, device), slots,
                   _activation_masks(token_slots, activation_of, device), {},
                   {s: activation_of[s] for s in slots})

    def slot_mask(self, slots: set[int]) -> torch.Tensor | None:
        """[N, 1] bool: rows whose slot is in `slots` (None when that is every row); memoised for the step."""
        key = frozenset(s for s in self.slots if s in slots)
        if len(key) == len(self.slots):
            return None
        if key not in self._masks:
            idx = torch.tensor(sorted(key), dtype=torch.long, device=self.table_index.device) + 1
            self._masks[key] = torch.isin(self.table_index, idx)[:, None]
        return self._masks[key]

    def bucket_rows(self, stacks: SublayerStacks) -> list[_BucketRows]:
        """The group's rows split by the rank bucket their slot's module is in at `stacks`; memoised per layout
        (layers whose stacks place the group's slots alike share it)."""
        layout = tuple(stacks.place.get(s) for s in self.slots)
        if layout not in self._parts:
            self._parts[layout] = _split_by_bucket(self, dict(zip(self.slots, layout)))
        return self._parts[layout]


@dataclass(eq=False)
class _BucketRows:
    """The rows of a TokenGroup whose modules are in one rank bucket (worked example: slots [3, 3, 7, 5] with slot
    7 in bucket 512 at index 0, slots 3 and 5 in bucket 16 at 1 and 0 → bucket 16: rows tensor [0, 1, 3], local
    [1, 1, 0]; bucket 512: rows slice(2, 3), local [0])."""
    width: int
    rows: torch.Tensor | slice | None     # group rows it covers; None: all N (the only bucket present)
    seg: SegmentMeta                      # segments by local index over those rows
    local: torch.Tensor                   # [n] long: local index per row (any index for a row in no segment)
    by_activation: dict[str, torch.Tensor | None]


def _activation_masks(token_slots: list[int | None], activation_of: dict[int, str],
                      device: torch.device) -> dict[str, torch.Tensor | None]:
    """activation -> [n, 1] bool rows using it, or {name: None} when all rows share one (a row whose slot is
    None, in no segment, may take any)."""
    acts = [activation_of[s] if s is not None else None for s in token_slots]
    names = sorted({a for a in acts if a is not None})
    if len(names) == 1:
        return {names[0]: None}
    return {a: torch.tensor([x == a for x in acts], device=device)[:, None] for a in names}


def _split_by_bucket(group: TokenGroup, place: dict[int, tuple[int, int] | None]) -> list[_BucketRows]:
    device = group.table_index.device
    token_slots = [slot for n, slot in zip(group.seg.len_list, group.seg.slot_list) for _ in range(n)]
    widths = sorted({p[0] for p in place.values() if p is not None})
    parts = []
    for width in widths:
        mine = [i for i, s in enumerate(token_slots) if place[s] is not None and place[s][0] == width]
        if len(widths) == 1:
            rows, slots = None, [s if place[s] is not None else None for s in token_slots]
        else:
            first = mine[0]
            contiguous = mine == list(range(first, first + len(mine)))
            rows = slice(first, first + len(mine)) if contiguous else torch.tensor(mine, dtype=torch.long,
                                                                                   device=device)
            slots = [token_slots[i] for i in mine]
        local = [place[s][1] if s is not None else None for s in slots]
        parts.append(_BucketRows(width, rows, SegmentMeta.from_token_slots(local, device),
                                 torch.tensor([i or 0 for i in local], dtype=torch.long, device=device),
                                 _activation_masks(slots, group.activation_of, device)))
    return parts


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
    if stacks.ln_after:
        u = _add_adapters(x, group, stacks, stacks.up_b[idx] + coef[:, 2:3] * o + coef[:, 3:4] * r)
        u = _layer_norm(u, stacks.lna_w[idx], stacks.lna_b[idx], group.slot_mask(set(stacks.ln_after)))
        return u + coef[:, 4:5] * o + coef[:, 5:6] * r
    return _add_adapters(x, group, stacks, coef[:, 4:5] * o + coef[:, 5:6] * r + stacks.up_b[idx])


def _add_adapters(x: torch.Tensor, group: TokenGroup, stacks: SublayerStacks, out: torch.Tensor) -> torch.Tensor:
    """out[i] += up(act(down(x[i]) + down_b)) of row i's module, one grouped shrink / expand per bucket present."""
    for part in group.bucket_rows(stacks):
        bucket = stacks.buckets[part.width]
        gathered = isinstance(part.rows, torch.Tensor)
        xb = x if part.rows is None else x[part.rows]
        d = _shrink(xb, bucket.down, part.seg) + bucket.down_b[part.local]
        if len(part.by_activation) == 1:
            d = ACTIVATIONS[next(iter(part.by_activation))](d)
        else:
            d = sum(torch.where(mask, ACTIVATIONS[name](d), 0.0) for name, mask in part.by_activation.items())
        ob = out if part.rows is None else out[part.rows]                  # a view unless gathered
        _expand(d, bucket.up, part.seg, ob)
        if gathered:
            out.index_copy_(0, part.rows, ob)
    return out


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
