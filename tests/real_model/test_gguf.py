"""GGUF models: the default model's file (fetched from the package index as the server does) converted by us and
served by our engine equals transformers reading the GGUF file itself; a file that is not what we expect is a
clear error, never a half-written cache entry."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import server.default_model as default_model
from server.config import EngineConfig
from server.engine import LLMEngine
from server.gguf import ensure_gguf_model
from tests.test_model_vs_hf import hf_reference, run_staggered


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    return default_model._fetch_gguf(tmp_path_factory.mktemp("wheel"))


def test_converted_gguf_equals_transformers_on_the_gguf_file(gguf_file, tmp_path):
    converted = ensure_gguf_model(gguf_file, tmp_path / "converted")
    assert ensure_gguf_model(gguf_file, tmp_path / "converted") == converted          # cached, not redone
    reference = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                     dtype=torch.float32).eval()
    engine = LLMEngine(EngineConfig(model=converted, dtype="float32", kv_cache_memory="64MiB"))
    prompt = engine.tokenizer.encode("The three primary colors are")
    tokens, logits = run_staggered(engine, [prompt], [0])
    ref_tokens, ref_logits = hf_reference(reference, prompt)
    assert tokens[0] == ref_tokens
    torch.testing.assert_close(logits[0], ref_logits, atol=1e-4, rtol=0)
    assert engine.tokenizer.chat_template and "<|im_start|>" in engine.tokenizer.chat_template


def test_not_a_gguf_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(ValueError, match="cannot read GGUF file"):
        ensure_gguf_model(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]


def test_changed_package_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(default_model, "GGUF_SHA256", "0" * 64)
    with pytest.raises(default_model.ModelUnavailable, match="has SHA-256 b179c952"):
        default_model.ensure_default_model(tmp_path / "model")
    assert not (tmp_path / "model").exists() and not list(tmp_path.iterdir())
