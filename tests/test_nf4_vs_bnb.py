"""A 4-bit NF4 base vs transformers + bitsandbytes (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
with and without double quant) on the same weights: the same bytes in every layer, greedy tokens identical and
logits within 1e-4 (fp32), solo and in staggered mixed batches; a checkpoint transformers saved pre-quantized
loads as it is; the memory the 4-bit base saves goes to the budgets."""
from __future__ import annotations

import shutil

import bitsandbytes.functional as bnbf
import pytest
import torch

from server.config import EngineConfig, total_memory_bytes
from server.engine import LLMEngine
from server.model.llama import Linear
from tests.test_model_vs_hf import ATOL, hf_reference, make_prompts, run_staggered
from tests.tiny_models import NF4_CONFIGS, load_hf_nf4

MODULES = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


def nf4_engine(path, double_quant: bool | None, **kw) -> LLMEngine:
    """double_quant None: no --quantize (a pre-quantized checkpoint, or the full-precision base)."""
    kw.setdefault("kv_cache_memory", "8MiB")
    kw.setdefault("block_size", 4)
    quant = {} if double_quant is None else dict(quantize="nf4", double_quant=double_quant)
    return LLMEngine(EngineConfig(model=str(path), dtype="float32", **quant, **kw))


@pytest.fixture(scope="module", params=[(kind, dq) for kind in NF4_CONFIGS for dq in (False, True)],
                ids=lambda p: f"{p[0]}-{'double' if p[1] else 'plain'}")
def nf4_pair(request, tiny_model_dir):
    kind, double_quant = request.param
    path = tiny_model_dir(kind)
    return kind, double_quant, path, load_hf_nf4(path, double_quant)


def our_part(engine: LLMEngine, layer: int, block: str, module: str):
    """Our NF4Weight of HF module `module` (its part of a fused linear)."""
    for linear in getattr(engine.runner.model.layers[layer], block).modules():
        if isinstance(linear, Linear) and module in linear.slices:
            return linear.quantized.parts[list(linear.slices).index(module)]
    raise KeyError(module)


def test_quantized_at_load_equals_bitsandbytes_bytes(nf4_pair):
    """Every decoder linear quantized as transformers did it (per HF module); lm_head, embeddings, norms not."""
    _, double_quant, path, hf = nf4_pair
    engine = nf4_engine(path, double_quant)
    for i, layer in enumerate(hf.model.layers):
        for block, modules in MODULES.items():
            for module in modules:
                theirs = getattr(getattr(layer, block), module).weight
                ours = our_part(engine, i, block, module)
                assert torch.equal(ours.packed, theirs.data), (i, module)
                state = theirs.quant_state
                assert torch.equal(ours.absmax, state.absmax)
                if double_quant:
                    assert torch.equal(ours.nested_absmax, state.state2.absmax)
                    assert torch.equal(ours.offset, state.offset)
    model = engine.runner.model
    assert model.lm_head.quantized is None and type(hf.lm_head) is torch.nn.Linear
    assert engine.runner.num_quantized == 4 * len(model.layers)    # qkv, o, gate_up, down
    # base_weight (DoRA's column norm) is the dequantized weight, as bitsandbytes dequantizes it
    v = hf.model.layers[1].self_attn.v_proj.weight
    assert torch.equal(model.base_weight(1, "v_proj"), bnbf.dequantize_4bit(v.data, v.quant_state))


def test_single_requests_match_bitsandbytes(nf4_pair):
    kind, _, path, hf = nf4_pair
    engine = nf4_engine(path, nf4_pair[1])
    for prompt in make_prompts(1, [1, 7, 26]):
        ref_tokens, ref_logits = hf_reference(hf, prompt)
        tokens, logits = run_staggered(engine, [prompt], [0])
        assert tokens[0] == ref_tokens, kind
        torch.testing.assert_close(logits[0], ref_logits, atol=ATOL, rtol=0)


def test_mixed_batch_matches_bitsandbytes(nf4_pair):
    kind, double_quant, path, hf = nf4_pair
    prompts = make_prompts(2, [3, 19, 8, 33, 1, 14])
    engine = nf4_engine(path, double_quant, max_num_batched_tokens=24)
    tokens, logits = run_staggered(engine, prompts, [0, 0, 2, 3, 3, 7])
    for i, prompt in enumerate(prompts):
        ref_tokens, ref_logits = hf_reference(hf, prompt)
        assert tokens[i] == ref_tokens, (kind, i)
        torch.testing.assert_close(logits[i], ref_logits, atol=ATOL, rtol=0)
    # 4-bit is not the full-precision model: the comparison above is with the quantized numerics
    full, _ = run_staggered(nf4_engine(path, None), prompts[:2], [0, 0])
    assert full != tokens[:2]


def test_prequantized_checkpoint_loads_as_saved(nf4_pair, tmp_path):
    """transformers' save_pretrained of its 4-bit model: packed weights + quant_state tensors, quantization_config
    in config.json; served without --quantize, it is the same model."""
    kind, double_quant, path, hf = nf4_pair
    saved = tmp_path / "saved"
    hf.save_pretrained(saved)
    for f in path.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, saved / f.name)
    engine = nf4_engine(saved, None)
    quantized_here = nf4_engine(path, double_quant)
    for block, modules in MODULES.items():
        for module in modules:
            a, b = our_part(engine, 2, block, module), our_part(quantized_here, 2, block, module)
            assert torch.equal(a.packed, b.packed) and torch.equal(a.absmax, b.absmax)
            assert a.double_quant == double_quant
    prompts = make_prompts(3, [9, 4])
    tokens, logits = run_staggered(engine, prompts, [0, 1])
    for i, prompt in enumerate(prompts):
        ref_tokens, ref_logits = hf_reference(hf, prompt)
        assert tokens[i] == ref_tokens
        torch.testing.assert_close(logits[i], ref_logits, atol=ATOL, rtol=0)


def test_prequantized_checkpoint_of_another_method_is_refused(tiny_model_dir, tmp_path):
    import json
    path = tiny_model_dir("llama-nf4")
    bad = tmp_path / "fp4"
    shutil.copytree(path, bad)
    config = json.loads((bad / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                     "bnb_4bit_quant_type": "fp4"}
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="only bitsandbytes NF4"):
        nf4_engine(bad, None)


def test_4bit_base_is_smaller_and_budgets_see_it(tiny_model_dir):
    """Linear weights <= 0.30x their fp32 bytes; a fractional KV budget is of the memory the base leaves."""
    path = tiny_model_dir("llama-nf4")
    full = nf4_engine(path, None, kv_cache_memory=0.001, max_adapter_memory=0.001)
    for double_quant in (False, True):
        nf4 = nf4_engine(path, double_quant, kv_cache_memory=0.001, max_adapter_memory=0.001)
        linears = [(a, b) for a, b in zip(full.runner.model.layers.modules(), nf4.runner.model.layers.modules())
                   if isinstance(a, Linear)]
        fp32_bytes = sum(a.weight.numel() * 4 for a, _ in linears)
        nf4_bytes = sum(b.quantized.nbytes for _, b in linears)
        assert nf4_bytes <= 0.30 * fp32_bytes
        assert full.runner.weight_bytes - nf4.runner.weight_bytes == fp32_bytes - nf4_bytes
        assert nf4.config.kv_cache_bytes == int(0.001 * (total_memory_bytes() - nf4.runner.weight_bytes))
        assert nf4.config.kv_cache_bytes > full.config.kv_cache_bytes
        assert nf4.config.max_adapter_bytes > full.config.max_adapter_bytes


def test_double_quant_needs_quantize():
    with pytest.raises(ValueError, match="double_quant needs"):
        EngineConfig(model="m", double_quant=True)
    with pytest.raises(ValueError, match="quantize must be"):
        EngineConfig(model="m", quantize="int4")
