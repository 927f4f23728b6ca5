"""server/runner.py's base-model decode steps (`_base_decode`: rows written into the decode stack's numpy buffers,
no BatchMeta) give the general path's logits bit for bit, step after step, as sequences of different lengths
start, cross block boundaries, finish and leave their rows to others; a step the kernel cannot take (a sliding
window) falls back to the general path."""
from __future__ import annotations

import pytest
import torch

from tests.test_model_vs_hf import engine_for, make_prompts, run_staggered


def run(path, dtype, base_decode: bool, prompts, arrivals, max_new):
    import tests.test_model_vs_hf as hf_tests
    engine = engine_for(path, dtype=dtype)
    engine.runner.base_decode = base_decode
    taken = []
    real = engine.runner.model.rows_logits

    def spy(*args):
        out = real(*args)
        taken.append(out is not None)
        return out
    engine.runner.model.rows_logits = spy
    old, hf_tests.MAX_NEW = hf_tests.MAX_NEW, max_new
    try:
        tokens, logits = run_staggered(engine, prompts, arrivals)
    finally:
        hf_tests.MAX_NEW = old
    return tokens, logits, taken


@pytest.mark.parametrize("kind,dtype", [("llama3", "float32"), ("qwen2", "float32"), ("llama", "bfloat16")])
def test_base_decode_steps_equal_the_general_path(tiny_model_dir, kind, dtype):
    path = tiny_model_dir(kind)
    prompts = make_prompts(41, [3, 9, 14, 6, 21])
    arrivals = [0, 0, 2, 9, 10]                         # later requests take the rows of finished ones
    fast = run(path, dtype, True, prompts, arrivals, 12)
    general = run(path, dtype, False, prompts, arrivals, 12)
    assert sum(fast[2]) >= 15 and all(fast[2])          # the base path ran the decode steps
    assert general[2] == []
    assert fast[0] == general[0]
    for a, b in zip(fast[1], general[1]):
        assert torch.equal(a, b)


def test_a_sliding_window_model_falls_back_to_the_general_path(tiny_model_dir):
    path = tiny_model_dir("mistral")
    prompts = make_prompts(42, [5, 16])
    fast = run(path, "float32", True, prompts, [0, 1], 10)
    general = run(path, "float32", False, prompts, [0, 1], 10)
    assert fast[2] and not any(fast[2])                 # asked, and declined: windowed masks
    assert fast[0] == general[0]
    for a, b in zip(fast[1], general[1]):
        assert torch.equal(a, b)
