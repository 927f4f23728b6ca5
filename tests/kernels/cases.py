"""Shared inputs for the SGMV tests: segment layouts (punica's `get_lora_lens` kinds), tensors, tolerances."""
from __future__ import annotations

import random

import torch

from kernels import SegmentMeta

SEED = 0

# The one tolerance table: an op's output in `dtype` vs the float32 reference rounded to `dtype`.
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}

LAYOUTS = ("distinct", "distinct_base", "uniform", "zipf", "identical", "skewed", "empty", "base_interleaved",
           "repeated_slot", "ordered_slots")


def segment_layout(kind: str, num_tokens: int, num_slots: int, seed: int = SEED) -> SegmentMeta:
    """A SegmentMeta of `kind` over about `num_tokens` rows (exactly, unless the kind adds base rows):
    distinct: one token per segment, each its own adapter (decode, punica's bgmv case)
    distinct_base: the same with every third row a base-model token (decodes without an adapter)
    uniform: 4 equal segments; zipf: adapter popularity ~ 1/rank^1.5, tokens grouped by adapter
    identical: one segment over everything; skewed: one long segment then single-token ones
    empty: segments of length 0 among real ones; base_interleaved: base-model rows (no segment) before,
    between and after segments; repeated_slot: one adapter in several non-adjacent segments;
    ordered_slots: short segments whose slots are 0, 1, 2, ... (requests ordered by slot)."""
    rng = random.Random(f"{seed}-{kind}")
    gaps = None  # base rows before each segment, and after the last
    slots = None
    if kind == "distinct":
        lens = [1] * num_tokens
    elif kind == "distinct_base":
        return SegmentMeta.from_token_slots([None if i % 3 == 1 else rng.randrange(num_slots)
                                             for i in range(num_tokens)])
    elif kind == "uniform":
        lens = [num_tokens // 4] * 3 + [num_tokens - 3 * (num_tokens // 4)]
    elif kind == "zipf":
        weights = [1 / (i + 1) ** 1.5 for i in range(num_slots)]
        counts = [0] * num_slots
        for slot in rng.choices(range(num_slots), weights, k=num_tokens):
            counts[slot] += 1
        slots = [s for s in rng.sample(range(num_slots), num_slots) if counts[s]]
        lens = [counts[s] for s in slots]
    elif kind == "identical":
        lens = [num_tokens]
    elif kind == "skewed":
        lens = [num_tokens - num_tokens // 4] + [1] * (num_tokens // 4)
    elif kind == "empty":
        lens = [0, 3, 0, 0, num_tokens - 5, 0, 1, 1, 0]
    elif kind == "base_interleaved":
        lens = [5, 1, 1, 9, 2, 1]
        gaps = [2, 1, 0, 3, 1, 2, num_tokens - 28]
    elif kind == "repeated_slot":
        lens = [3, 1, 4, 1, 5, 2, num_tokens - 16]
        slots = [0, 1, 0, 1, 0, 0, 1]  # includes equal slots back to back, kept as separate segments
    elif kind == "ordered_slots":
        lens = [8, 7, 8, 7, 5, num_tokens - 35]
        slots = list(range(len(lens)))
    else:
        raise ValueError(kind)
    gaps = gaps or [0] * (len(lens) + 1)
    if slots is None:
        pool = list(range(num_slots))
        slots = rng.sample(pool, len(lens)) if len(lens) <= num_slots else rng.choices(pool, k=len(lens))
    starts, row = [], 0
    for gap, n in zip(gaps, lens):
        starts.append(row + gap)
        row += gap + n
    return SegmentMeta.from_segments(starts, lens, slots, row + gaps[-1])


def make_inputs(seg: SegmentMeta, h_in: int, h_out: int, rank: int, num_slots: int, dtype: torch.dtype,
                extra_cols: int = 0, seed: int = SEED) -> dict[str, torch.Tensor]:
    """x [T, H_in], lora_a [S, R, H_in], lora_b [S, H_out, R], y [T, R], out [T, H_out + extra_cols],
    scaled so every output is O(1)."""
    g = torch.Generator().manual_seed(seed)
    t = seg.num_tokens
    return dict(
        x=torch.randn(t, h_in, generator=g).to(dtype),
        lora_a=(torch.randn(num_slots, rank, h_in, generator=g) / h_in ** 0.5).to(dtype),
        lora_b=(torch.randn(num_slots, h_out, rank, generator=g) / rank ** 0.5).to(dtype),
        y=torch.randn(t, rank, generator=g).to(dtype),
        out=torch.randn(t, h_out + extra_cols, generator=g).to(dtype),
    )


def rows_in_no_segment(seg: SegmentMeta) -> list[int]:
    covered = {r for s, n in zip(seg.start_list, seg.len_list) for r in range(s, s + n)}
    return [r for r in range(seg.num_tokens) if r not in covered]
