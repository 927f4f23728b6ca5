"""The served weights in one huge-page mapping (server/model/weight_arena.py): same values, ties kept, laid out in
the order a decode step reads them, and the engine's outputs unchanged by the move."""
from __future__ import annotations

import pytest
import torch

from server.config import EngineConfig
from server.engine import LLMEngine
from server.model.loader import load_model
from server.model.weight_arena import HUGE_PAGE, decode_order, huge_page_buffer, move_to_arena
from tests.test_model_vs_hf import hf_reference, make_prompts, run_staggered
from tests.tiny_models import load_hf


def _span(t: torch.Tensor) -> tuple[int, int]:
    return t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()


@pytest.mark.parametrize("kind", ["llama3", "qwen2"])            # tied embeddings; qkv biases
def test_move_keeps_values_and_ties_and_lays_weights_out_in_decode_order(tiny_model_dir, kind):
    model, _ = load_model(str(tiny_model_dir(kind)), "float32")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    tied = model.lm_head.weight.data_ptr() == model.embed_tokens.weight.data_ptr()
    assert tied == (kind == "llama3")
    arena = move_to_arena(model)
    assert arena is not None
    base = torch.frombuffer(arena, dtype=torch.uint8).data_ptr()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[name], rtol=0, atol=0)
        start, end = _span(p)
        assert base <= start and end <= base + len(arena), f"{name} is not in the arena"
    assert (model.lm_head.weight.data_ptr() == model.embed_tokens.weight.data_ptr()) == tied
    starts = []
    for p in decode_order(model):
        if p.data_ptr() not in starts:
            starts.append(p.data_ptr())
    assert starts == sorted(starts), "not in the order a decode step reads them"
    assert starts[0] % HUGE_PAGE == 0
    spans = sorted(_span(p) for p in {p.data_ptr(): p for p in model.parameters()}.values())
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "tensors overlap"


def test_engine_on_the_arena_matches_transformers(tiny_model_dir):
    path = tiny_model_dir("qwen2")
    engine = LLMEngine(EngineConfig(model=str(path), dtype="float32", kv_cache_memory="4MiB", block_size=4))
    arena = engine.runner.weight_arena
    assert arena is not None
    weight = engine.runner.model.layers[1].mlp.down_proj.weight
    base = torch.frombuffer(arena, dtype=torch.uint8).data_ptr()
    assert base <= weight.data_ptr() < base + len(arena)
    prompts = make_prompts(31, [7, 13])
    tokens, logits = run_staggered(engine, prompts, [0, 1])
    hf = load_hf(path)
    for prompt, got, got_logits in zip(prompts, tokens, logits):
        ref_tokens, ref_logits = hf_reference(hf, prompt)
        assert got == ref_tokens
        torch.testing.assert_close(got_logits, ref_logits, atol=1e-4, rtol=0)


def test_huge_page_buffer_is_aligned_zeroed_and_outlives_its_mapping_name():
    _, t = huge_page_buffer(3 * HUGE_PAGE + 5)
    assert t.numel() == 3 * HUGE_PAGE + 5 and t.data_ptr() % HUGE_PAGE == 0
    assert int(t.count_nonzero()) == 0
    t.fill_(7)                                   # the mapping is kept alive by the tensor alone
    assert int(t[-1]) == 7


def test_a_4bit_base_keeps_its_quantized_layers_and_moves_the_rest(tiny_model_dir):
    model, _ = load_model(str(tiny_model_dir("llama-nf4")), "float32", quantize="nf4")
    quantized = model.layers[0].self_attn.qkv_proj
    assert quantized.quantized is not None
    placeholder = quantized.weight.data_ptr()
    arena = move_to_arena(model)
    base = torch.frombuffer(arena, dtype=torch.uint8).data_ptr()
    assert quantized.weight.data_ptr() == placeholder                     # zero-strided: nothing to move
    assert base <= model.layers[0].input_layernorm.weight.data_ptr() < base + len(arena)
    assert base <= model.embed_tokens.weight.data_ptr() < base + len(arena)
