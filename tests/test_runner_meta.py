"""server/runner.py: a decode-only step's metadata built by the short path (`_decode_meta`) equals the general
builder's (`_meta`) tensor for tensor, with and without a sliding window, for sequences of different lengths
(padded block tables) and adapters; steps the short path does not take still build."""
from __future__ import annotations

import pytest
import torch

from server.sampling import SamplingParams
from tests.test_model_vs_hf import engine_for, make_prompts


def decode_orders(engine, prompts, steps):
    """The scheduled items of `steps` decode-only steps (and whether every step was decode-only)."""
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    runner, orders = engine.runner, []
    runner.base_decode = False              # base-model decode steps build their metadata too (tests/test_base_decode.py)
    real = runner.build_meta

    def spy(order):
        orders.append(list(order))
        return real(order)
    runner.build_meta = spy
    while len(orders) < steps and engine.has_unfinished():
        engine.step()
    return orders


def same(a, b, path="meta"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            same(a[k], b[k], f"{path}[{k}]")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{path}[{i}]")
    elif hasattr(a, "__dataclass_fields__"):
        for name in a.__dataclass_fields__:
            if name not in ("hooks", "adapters"):
                same(getattr(a, name), getattr(b, name), f"{path}.{name}")
    else:
        assert a == b, path


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_the_decode_path_builds_the_general_builders_tensors(kind, tiny_model_dir):
    engine = engine_for(tiny_model_dir(kind))
    orders = decode_orders(engine, make_prompts(3, [2, 14, 7]), 20)
    runner = engine.runner
    decode_only = [o for o in orders if all(item.num_tokens == 1 for item in o)]
    assert len(decode_only) >= 10                           # windows (12) and block boundaries (4) crossed
    for order in decode_only:
        fast, _ = runner._decode_meta(order)
        general, rows, sampled = runner._meta(order)
        assert rows == list(range(len(order))) and sampled == order
        same(fast, general)
        if kind == "mistral":
            assert 12 in fast.attn_groups[0].masks and not torch.equal(fast.attn_groups[0].masks[12],
                                                                      fast.attn_groups[0].masks[None])


def test_prefill_and_mixed_steps_take_the_general_builder(tiny_model_dir, monkeypatch):
    engine = engine_for(tiny_model_dir("llama"))
    calls = []
    real = engine.runner._decode_meta
    monkeypatch.setattr(engine.runner, "_decode_meta", lambda order: calls.append(len(order)) or real(order))
    orders = decode_orders(engine, make_prompts(4, [5, 9]), 6)
    kinds = ["decode" if all(i.num_tokens == 1 for i in o) else "other" for o in orders]
    assert kinds[0] == "other" and "decode" in kinds
    assert len(calls) == kinds.count("decode")
