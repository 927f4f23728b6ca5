"""LoRA adapters of very different ranks on one fused linear: each row equals its adapter alone and the literal
x @ A.T @ B.T (DoRA: g times the base output), and a narrow adapter's rows go only through its own rank class's
stacks (the segments and weight shapes the LinearLora hands the SGMV kernels, recorded at the `kernels` seam)."""
from __future__ import annotations

from types import SimpleNamespace

import torch

import kernels
from adapters.lora import LoraModule
from adapters.lora_runtime import LinearLora
from kernels import SegmentMeta, lora_fused

IN = 32
SLICES = {"q_proj": (0, 48), "k_proj": (48, 16), "v_proj": (64, 16)}
# slot -> {slice: rank}; slot 2 is DoRA on q_proj. Rank classes: 16, 256, 64, 64.
RANKS = {0: {"q_proj": 4, "v_proj": 4}, 1: {"q_proj": 200, "k_proj": 200, "v_proj": 200}, 2: {"q_proj": 64},
         3: {"k_proj": 8, "v_proj": 40}}
TOKEN_SLOTS = [None, 0, 0, 1, 2, 2, None, 3, 0, 1, 1, 3, 2]


def site():
    g = torch.Generator().manual_seed(0)
    return SimpleNamespace(weight=torch.randn(80, IN, generator=g), bias=torch.randn(80, generator=g), layer=0,
                           slices=SLICES)


def adapters() -> dict[int, dict[str, LoraModule]]:
    g = torch.Generator().manual_seed(1)
    out = {}
    for slot, ranks in RANKS.items():
        out[slot] = {name: LoraModule(torch.randn(r, IN, generator=g) / IN ** 0.5,
                                      torch.randn(SLICES[name][1], r, generator=g) / r ** 0.5,
                                      1 + 0.1 * torch.randn(SLICES[name][1], generator=g) if slot == 2 else None)
                     for name, r in ranks.items()}
    return out


def apply(lora: LinearLora, linear, x: torch.Tensor, token_slots: list[int | None]) -> torch.Tensor:
    y = x @ linear.weight.T + linear.bias
    meta = SimpleNamespace(adapters={"lora": SimpleNamespace(segments=[SegmentMeta.from_token_slots(token_slots)])})
    lora(x, y, meta, linear)
    return y


def reference(linear, x: torch.Tensor, modules: dict[str, LoraModule]) -> torch.Tensor:
    y = x @ linear.weight.T + linear.bias
    for name, m in modules.items():
        cols = slice(SLICES[name][0], SLICES[name][0] + SLICES[name][1])
        if m.dora_scale is not None:
            y[:, cols] = (y[:, cols] - linear.bias[cols]) * m.dora_scale + linear.bias[cols]
        y[:, cols] += x @ m.lora_a.T @ m.lora_b.T
    return y


def loaded(linear, mods: dict[int, dict[str, LoraModule]]) -> LinearLora:
    lora = LinearLora(linear)
    for slot, modules in mods.items():
        lora.set_slot(slot, modules)
    return lora


def test_mixed_ranks_equal_each_adapter_alone_and_the_formula():
    linear, mods = site(), adapters()
    x = torch.randn(len(TOKEN_SLOTS), IN, generator=torch.Generator().manual_seed(2))
    lora = loaded(linear, mods)
    assert sorted(lora.buckets) == [16, 64, 256] and lora.buckets[64].a.shape == (2, 64 + 8 + 40, IN)
    mixed = apply(lora, linear, x, TOKEN_SLOTS)
    for slot in [None, *mods]:
        rows = [i for i, s in enumerate(TOKEN_SLOTS) if s == slot]
        want = reference(linear, x[rows], mods.get(slot, {}))
        torch.testing.assert_close(mixed[rows], want, atol=1e-5, rtol=1e-5, msg=f"slot {slot}")
        if slot is not None:
            alone = apply(loaded(linear, {slot: mods[slot]}), linear, x[rows], [slot] * len(rows))
            torch.testing.assert_close(mixed[rows], alone, atol=1e-6, rtol=1e-6, msg=f"slot {slot}")
    lora.clear_slot(1)
    assert sorted(lora.buckets) == [16, 64]
    again = apply(lora, linear, x, TOKEN_SLOTS)
    keep = [i for i, s in enumerate(TOKEN_SLOTS) if s != 1]
    torch.testing.assert_close(again[keep], mixed[keep], atol=0, rtol=0)
    wide_rows = [i for i, s in enumerate(TOKEN_SLOTS) if s == 1]
    torch.testing.assert_close(again[wide_rows], reference(linear, x[wide_rows], {}))


def test_a_narrow_adapter_does_not_pay_for_a_wide_one(monkeypatch):
    linear, mods = site(), adapters()
    lora = loaded(linear, mods)
    calls = []
    shrink, fused = kernels.sgmv_shrink, lora_fused.lora_fused

    def record(w, seg):                         # (weight stack shape, slots of the rows it multiplies)
        calls.append((tuple(w.shape), {token_slots[r] for s, n in zip(seg.start_list, seg.len_list)
                                       for r in range(s, s + n)}))

    def rec_shrink(x, w, seg):                  # the torch path's shrink
        record(w, seg)
        return shrink(x, w, seg)

    def rec_fused(x, w, sl, seg, y):            # the C kernel's shrink + expands
        record(w, seg)
        return fused(x, w, sl, seg, y)
    monkeypatch.setattr(kernels, "sgmv_shrink", rec_shrink)
    monkeypatch.setattr(lora_fused, "lora_fused", rec_fused)
    token_slots = TOKEN_SLOTS
    apply(lora, linear, torch.randn(len(token_slots), IN), token_slots)
    assert calls == [((1, 8, IN), {0}), ((2, 112, IN), {2, 3}), ((1, 600, IN), {1})]
    calls.clear()
    token_slots = [0, 0, None, 3, 2]
    apply(lora, linear, torch.randn(len(token_slots), IN), token_slots)
    assert calls == [((1, 8, IN), {0}), ((2, 112, IN), {2, 3})]            # the loaded r 200 adapter costs nothing
