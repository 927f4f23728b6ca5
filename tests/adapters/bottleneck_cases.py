"""Bottleneck adapters of very different ranks built in code (random weights, every math option), shared by
tests/adapters/test_bottleneck_ranks.py and the Triton interpreter worker
tests/kernels/bottleneck_interpret_worker.py."""
from __future__ import annotations

import random

import torch

from adapters.bottleneck import MLP, BnMath, BnModule, BottleneckAdapter
from adapters.bottleneck_stacks import SublayerStacks, TokenGroup, grouped_sublayer

CPU = torch.device("cpu")
HIDDEN, LAYER = 64, 0


def module(rank: int, g: torch.Generator, ln_before=False, ln_after=False) -> BnModule:
    def norm():
        return 1 + 0.1 * torch.randn(HIDDEN, generator=g), 0.1 * torch.randn(HIDDEN, generator=g)
    return BnModule(torch.randn(rank, HIDDEN, generator=g) / HIDDEN ** 0.5, 0.1 * torch.randn(rank, generator=g),
                    torch.randn(HIDDEN, rank, generator=g) / rank ** 0.5, 0.1 * torch.randn(HIDDEN, generator=g),
                    norm() if ln_before else None, norm() if ln_after else None)


def make_adapters() -> list[BottleneckAdapter]:
    """Slot -> adapter: ranks 200, 3, 40, (none at this position), 16, 130: rank classes 256, 16, 64, -, 16, 256."""
    g = torch.Generator().manual_seed(0)
    specs = [
        (BnMath(is_parallel=True, non_linearity="swish"), module(200, g)),
        (BnMath(), module(3, g)),
        (BnMath(ln_before=True, non_linearity="sigmoid"), module(40, g, ln_before=True)),
        (BnMath(), None),
        (BnMath(ln_after=True, adapter_residual_before_ln=True, non_linearity="tanh"), module(16, g, ln_after=True)),
        (BnMath(original_ln_before=False, residual_before_ln=False, non_linearity="gelu"), module(130, g)),
    ]
    return [BottleneckAdapter(f"/x/{i}", f"a{i}", math, {(LAYER, MLP): m} if m is not None else {})
            for i, (math, m) in enumerate(specs)]


def stacks_of(adapters: dict[int, BottleneckAdapter], dtype: torch.dtype = torch.float32) -> SublayerStacks:
    stacks = SublayerStacks(HIDDEN, dtype, CPU)
    for slot, a in adapters.items():
        stacks.set_slot(slot, a.modules.get((LAYER, MLP)), a.math, max(adapters) + 1)
    return stacks


def run(stacks: SublayerStacks, token_slots: list[int], adapters, o, r) -> torch.Tensor:
    acts = {s: adapters[s].math.non_linearity for s in set(token_slots)}
    group = TokenGroup.build(list(range(len(token_slots))), token_slots, acts, CPU)
    return grouped_sublayer(o, r, group, stacks)


def mixed_case(dtype: torch.dtype) -> tuple[list[BottleneckAdapter], list[int], torch.Tensor, torch.Tensor]:
    """(adapters, token slots: every slot in 3 rounds of runs of 1-3 rows, o, r [N, HIDDEN] in dtype)."""
    adapters = make_adapters()
    rng = random.Random(0)
    token_slots = [s for _ in range(3) for s in rng.sample(range(len(adapters)), len(adapters))
                   for _ in range(rng.randint(1, 3))]
    g = torch.Generator().manual_seed(1)
    o, r = torch.randn(len(token_slots), HIDDEN, generator=g), torch.randn(len(token_slots), HIDDEN, generator=g)
    return adapters, token_slots, o.to(dtype), r.to(dtype)
