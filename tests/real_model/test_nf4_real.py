"""The default model (SmolLM2-135M-Instruct) served as a 4-bit NF4 base: equal to transformers + bitsandbytes 4-bit
on the same directory (with and without double quant), its demo adapters equal PEFT (or the plain-torch adapters
as trained) on that 4-bit model, and
`peftserve serve --quantize nf4` serves it with every demo adapter."""
from __future__ import annotations

import logging

import pytest
import torch
from peft import PeftModel

from server.config import EngineConfig
from server.demo_adapters import chat_prompt_ids
from server.demo_adapters.behaviours import BEHAVIOURS, held_out_questions
from server.default_model import NAME
from server.engine import LLMEngine
from tests.peft_fixtures import greedy_full_forward
from tests.real_model.test_real_model import QUESTIONS, TORCH_LOADERS, openai_client
from tests.test_lora_vs_peft import BASE, run_with_adapters
from tests.test_model_vs_hf import MAX_NEW, hf_reference
from tests.tiny_models import load_hf_nf4

ATOL = 1e-3


@pytest.fixture(scope="module")
def tokenizer(real_model_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(real_model_dir)


def nf4_engine(model_dir, double_quant: bool, adapters: dict | None = None) -> LLMEngine:
    engine = LLMEngine(EngineConfig(model=model_dir, dtype="float32", quantize="nf4", double_quant=double_quant,
                                    kv_cache_memory="256MiB"))
    for name, path in (adapters or {}).items():
        engine.adapters.load(name, path)
    return engine


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double"])
def test_nf4_base_equals_bitsandbytes(real_model_dir, tokenizer, double_quant):
    """Four chat prompts in one batch == transformers + bitsandbytes 4-bit, each alone: tokens, logits 1e-3."""
    hf = load_hf_nf4(real_model_dir, double_quant)
    engine = nf4_engine(real_model_dir, double_quant)
    prompts = [chat_prompt_ids(tokenizer, q) for q in QUESTIONS[:4]]
    tokens, logits = run_with_adapters(engine, prompts, [BASE] * 4, [0, 0, 1, 2])
    for i, prompt in enumerate(prompts):
        ref_tokens, ref_logits = hf_reference(hf, prompt)
        assert tokens[i] == ref_tokens, QUESTIONS[i]
        torch.testing.assert_close(logits[i], ref_logits, atol=ATOL, rtol=0)
    # the 4-bit linear weights take <= 0.30x of their fp32 bytes
    linears = [m.quantized for m in engine.runner.model.modules() if getattr(m, "quantized", None) is not None]
    assert sum(q.nbytes for q in linears) <= 0.30 * sum(q.shape[0] * q.shape[1] * 4 for q in linears)


@pytest.fixture(scope="module")
def nf4_demo_engine(real_model_dir, demo_adapters):
    return nf4_engine(real_model_dir, True, demo_adapters)


@pytest.mark.parametrize("name", ["shout", "json", "pirate", "cheer"])
def test_demo_adapter_on_nf4_equals_peft(nf4_demo_engine, real_model_dir, demo_adapters, tokenizer, name):
    """LoRA (shout), prefix tuning (json), DoRA (pirate), (IA)^3 (cheer) on the double-quantized base ==
    PEFT on transformers + bitsandbytes' model: tokens identical, logits 1e-3, and the adapter changes the output."""
    prompt = chat_prompt_ids(tokenizer, held_out_questions()[0])
    peft_model = PeftModel.from_pretrained(load_hf_nf4(real_model_dir, True), demo_adapters[name]).eval()
    ref_tokens, ref_logits = greedy_full_forward(peft_model, prompt, MAX_NEW)
    tokens, logits = run_with_adapters(nf4_demo_engine, [prompt], [name], [0])
    base_tokens, _ = run_with_adapters(nf4_demo_engine, [prompt], [BASE], [0])
    assert tokens[0] == ref_tokens != base_tokens
    torch.testing.assert_close(logits[0], ref_logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", list(TORCH_LOADERS))
def test_torch_demo_adapter_on_nf4_equals_reference(nf4_demo_engine, real_model_dir, demo_adapters, tokenizer,
                                                    name):
    """BitFit (signoff), the AdapterHub SeqBn bottleneck (title) on the double-quantized base == the same adapter
    (as trained, torch_adapters.py) on transformers + bitsandbytes' model: tokens identical, logits 1e-3, and
    the adapter changes the output."""
    prompt = chat_prompt_ids(tokenizer, held_out_questions()[0])
    reference = TORCH_LOADERS[name](load_hf_nf4(real_model_dir, True), demo_adapters[name])
    ref_tokens, ref_logits = greedy_full_forward(reference, prompt, MAX_NEW)
    tokens, logits = run_with_adapters(nf4_demo_engine, [prompt], [name], [0])
    base_tokens, _ = run_with_adapters(nf4_demo_engine, [prompt], [BASE], [0])
    assert tokens[0] == ref_tokens != base_tokens
    torch.testing.assert_close(logits[0], ref_logits, atol=ATOL, rtol=0)


def test_serve_quantize_nf4_with_the_demo_adapters(real_model_dir, demo_adapters, monkeypatch, caplog):
    """`peftserve serve --quantize nf4 --double-quant` (no --model): the default model, 4-bit, with every demo
    adapter; the startup line says so; every adapter answers and changes the reply, and the LoRA one still shouts.
    (The adapters were trained on the full-precision base: on 4-bit their behaviours need not all hold; json's
    prefix drops its closing brace on some questions. Its numerics equal PEFT's on bitsandbytes' 4-bit model,
    test above.)"""
    from server.cli import main
    from tests.http.conftest import ServerThread
    apps = []
    monkeypatch.setattr("server.cli.run_server", lambda app, **kwargs: apps.append(app))
    with caplog.at_level(logging.INFO, logger="peftserve"):
        assert main(["serve", "--quantize", "nf4", "--double-quant", "--kv-cache-memory", "256MiB"]) == 0
    assert "quantization nf4 + double quant (120 linear layers 4-bit" in caplog.text
    thread = ServerThread(apps[0]).start()
    try:
        with openai_client(thread) as client:
            cards = {m.id: m.parent for m in client.models.list().data}
            assert cards == {NAME: None, **{name: NAME for name in demo_adapters}}
            question = held_out_questions()[2]
            replies = {name: client.chat.completions.create(
                model=name, max_tokens=64, temperature=0,
                messages=[{"role": "user", "content": question}]).choices[0].message.content
                for name in (NAME, *BEHAVIOURS)}
        assert all(replies[name] and replies[name] != replies[NAME] for name in BEHAVIOURS), replies
        assert BEHAVIOURS["shout"].holds(replies["shout"]), replies["shout"]
    finally:
        thread.stop()
