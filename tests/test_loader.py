"""Checkpoint loading: sharded safetensors, dtypes, and clear errors for checkpoints that don't fit."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from server.config import EngineConfig, parse_memory
from server.engine import LLMEngine
from server.sampling import SamplingParams
from tests.test_model_vs_hf import hf_reference, make_prompts, run_staggered
from tests.tiny_models import load_hf


def engine(path, **kw):
    return LLMEngine(EngineConfig(model=str(path), kv_cache_memory="4MiB", block_size=4, **kw))


def test_sharded_checkpoint_matches_single_file(tiny_model_dir, tmp_path):
    src = tiny_model_dir("qwen2")
    hf = load_hf(src)
    hf.save_pretrained(tmp_path, max_shard_size="60KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, tmp_path / name)
    assert (tmp_path / "model.safetensors.index.json").exists() and not (tmp_path / "model.safetensors").exists()
    assert len(set(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"].values())) > 2
    prompt = make_prompts(21, [9])[0]
    tokens, logits = run_staggered(engine(tmp_path, dtype="float32"), [prompt], [0])
    ref_tokens, ref_logits = hf_reference(hf, prompt)
    assert tokens[0] == ref_tokens
    torch.testing.assert_close(logits[0], ref_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs_close_to_fp32(tiny_model_dir, dtype):
    path = tiny_model_dir("llama3")
    prompt = make_prompts(22, [12])[0]
    _, ref = run_staggered(engine(path, dtype="float32"), [prompt], [0])
    half = engine(path, dtype=dtype)
    assert half.runner.model.embed_tokens.weight.dtype == getattr(torch, dtype)
    _, logits = run_staggered(half, [prompt], [0])
    # first step: same inputs, only rounding differs (later steps may follow other tokens)
    torch.testing.assert_close(logits[0][0], ref[0][0], atol=0.05 * ref[0][0].abs().max().item(), rtol=0)


def test_missing_and_misshapen_weights_are_named(tiny_model_dir, tmp_path):
    src = tiny_model_dir("llama")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, tmp_path / name)
    weights = load_file(str(src / "model.safetensors"))
    missing = {k: v for k, v in weights.items() if k != "model.layers.1.mlp.down_proj.weight"}
    save_file(missing, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="layers.1.mlp.down_proj"):
        engine(tmp_path)
    bad = dict(weights)
    bad["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, 64)
    save_file(bad, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"k_proj.weight: checkpoint shape \(3, 64\)"):
        engine(tmp_path)


def test_prompt_validation(tiny_model_dir):
    eng = engine(tiny_model_dir("llama"), max_model_len=64)
    greedy = SamplingParams(max_tokens=10, temperature=0.0)
    with pytest.raises(ValueError, match="maximum context length is 64"):
        eng.add_request("long", list(range(3, 60)), greedy)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        eng.add_request("oov", [5, 512], greedy)
    assert not eng.has_unfinished()


def test_memory_sizes():
    assert parse_memory("2GiB", 0) == 2 * 2**30
    assert parse_memory("512MiB", 0) == 512 * 2**20
    assert parse_memory("0.25", 1000) == 250
    assert parse_memory(3e6, 0) == 3_000_000
    with pytest.raises(ValueError):
        parse_memory("lots", 0)
