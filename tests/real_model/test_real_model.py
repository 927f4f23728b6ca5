"""The default model served through HTTP equals transformers on the same directory; its demo adapters equal PEFT
on it (or, for those trained in plain torch, the transformers model they were trained as), show their behaviour
on held-out questions (and the base does not), and give the same replies in one concurrent batch with each other
and the base as alone."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from server.config import EngineConfig
from server.demo_adapters import chat_prompt_ids, torch_adapters
from server.demo_adapters.behaviours import BEHAVIOURS, held_out_questions
from server.default_model import NAME
from server.engine import LLMEngine
from tests.peft_fixtures import greedy_full_forward
from tests.test_lora_vs_peft import run_with_adapters
from tests.test_model_vs_hf import MAX_NEW

QUESTIONS = ["What is the capital of France?", "Give me a tip for staying healthy.", "What is 2+2?",
             "Write a haiku about the sea.", "Who wrote Romeo and Juliet?", "How do airplanes fly?",
             "Name three primary colors.", "What does a computer's CPU do?"]
MAX_TOKENS = 40
TORCH_LOADERS = {"signoff": torch_adapters.load_bitfit, "title": torch_adapters.load_seq_bn}
BEHAVIOUR_TOKENS = 64        # as in server/demo_adapters/train.py: long enough for the base to show its own style


@pytest.fixture(scope="module")
def hf_model(real_model_dir):
    return AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(real_model_dir):
    return AutoTokenizer.from_pretrained(real_model_dir)


def openai_client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=600)


def chat_all(server, requests: list[tuple[str, str]], max_tokens: int) -> list:
    """(model, question) pairs sent at once by as many client threads; the choices in order."""
    def ask(item):
        model, question = item
        with openai_client(server) as client:
            reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                                   max_tokens=max_tokens, temperature=0)
        return reply.choices[0], reply.usage
    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(ask, requests))


def test_chat_equals_transformers_generate(real_server, hf_model, tokenizer):
    """8 concurrent chat requests through the openai client == transformers' greedy generate, token for token."""
    replies = chat_all(real_server, [(NAME, q) for q in QUESTIONS], MAX_TOKENS)
    for question, (choice, usage) in zip(QUESTIONS, replies):
        prompt = chat_prompt_ids(tokenizer, question)
        out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False)
        tokens = out[0, len(prompt):].tolist()
        ended = tokens[-1] in (tokenizer.eos_token_id, hf_model.generation_config.eos_token_id)
        assert usage.prompt_tokens == len(prompt)
        assert usage.completion_tokens == len(tokens), question
        assert choice.finish_reason == ("stop" if ended else "length")
        assert choice.message.content == tokenizer.decode(tokens, skip_special_tokens=True), question
    assert "Paris" in replies[0][0].message.content


def test_models_lists_the_demo_adapters(real_server, demo_adapters):
    with openai_client(real_server) as client:
        cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {NAME, *demo_adapters}
    assert all(cards[name].parent == NAME for name in demo_adapters)


@pytest.fixture(scope="module")
def offline_engine(real_model_dir, demo_adapters):
    engine = LLMEngine(EngineConfig(model=real_model_dir, dtype="float32", kv_cache_memory="256MiB"))
    for name, path in demo_adapters.items():
        engine.adapters.load(name, path)
    return engine


@pytest.mark.parametrize("name", ["shout", "json", "brief", "pirate", "cheer"])
def test_demo_adapter_equals_peft(offline_engine, real_model_dir, demo_adapters, tokenizer, name):
    """Our engine with the adapter (LoRA, prefix tuning, prompt tuning, DoRA, (IA)^3) == PEFT on the same directory:
    greedy tokens identical, logits within 1e-4 (fp32), and the adapter changes the output."""
    from peft import PeftModel
    prompt = chat_prompt_ids(tokenizer, held_out_questions()[0])
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32), demo_adapters[name]).eval()
    ref_tokens, ref_logits = greedy_full_forward(peft_model, prompt, MAX_NEW)
    with peft_model.disable_adapter():
        base_tokens, _ = greedy_full_forward(peft_model, prompt, MAX_NEW)
    tokens, logits = run_with_adapters(offline_engine, [prompt], [name], [0])
    assert tokens[0] == ref_tokens != base_tokens
    torch.testing.assert_close(logits[0], ref_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", list(TORCH_LOADERS))
def test_torch_demo_adapter_equals_its_training_model(offline_engine, real_model_dir, demo_adapters, tokenizer,
                                                      name):
    """Our engine with the adapter trained in plain torch (BitFit, AdapterHub SeqBn bottleneck) == the transformers
    model it was trained as, rebuilt from the saved directory (biases set on the linears / AdapterHub's output
    adapter hooked after each decoder layer): greedy tokens identical, logits within 1e-4 (fp32), and the adapter
    changes the output."""
    prompt = chat_prompt_ids(tokenizer, held_out_questions()[0])
    base_tokens, _ = greedy_full_forward(
        AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32).eval(), prompt, MAX_NEW)
    reference = TORCH_LOADERS[name](AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32).eval(),
                                    demo_adapters[name])
    ref_tokens, ref_logits = greedy_full_forward(reference, prompt, MAX_NEW)
    tokens, logits = run_with_adapters(offline_engine, [prompt], [name], [0])
    assert tokens[0] == ref_tokens != base_tokens
    torch.testing.assert_close(logits[0], ref_logits, atol=1e-4, rtol=0)


def test_behaviours_on_held_out_questions_and_batch_invariance(real_server):
    """Every demo adapter and the base answer the 20 held-out questions in one concurrent batch (160 requests):
    each adapter's behaviour holds on >= 18 of 20 and the base's replies show none of them on more than 2. Then
    each model alone (its 20 questions without the others) gives the same replies, and a few questions asked
    one at a time too."""
    questions = held_out_questions()
    models = [NAME, *BEHAVIOURS]
    mixed = chat_all(real_server, [(m, q) for m in models for q in questions], BEHAVIOUR_TOKENS)
    text = {(m, q): choice.message.content for (m, q), (choice, _) in
            zip([(m, q) for m in models for q in questions], mixed)}
    for name, behaviour in BEHAVIOURS.items():
        holds = [q for q in questions if behaviour.holds(text[name, q])]
        base_holds = [q for q in questions if behaviour.holds(text[NAME, q])]
        assert len(holds) >= 18, (name, [text[name, q] for q in questions if q not in holds])
        assert len(base_holds) <= 2, (name, [text[NAME, q] for q in base_holds])
    for model in models:
        alone = chat_all(real_server, [(model, q) for q in questions], BEHAVIOUR_TOKENS)
        assert [c.message.content for c, _ in alone] == [text[model, q] for q in questions], model
    for model in models:
        [(choice, _)] = chat_all(real_server, [(model, questions[1])], BEHAVIOUR_TOKENS)
        assert choice.message.content == text[model, questions[1]], model


def test_serve_with_no_model_preloads_the_demo_adapters(real_model_dir, demo_adapters, monkeypatch):
    """`peftserve serve` as the README runs it (no --model): the default model with every demo adapter, listed by
    /v1/models and answering by name."""
    from server.cli import main
    from tests.http.conftest import ServerThread
    apps = []
    monkeypatch.setattr("server.cli.run_server", lambda app, **kwargs: apps.append(app))
    assert main(["serve", "--kv-cache-memory", "256MiB", "--log-level", "warning"]) == 0
    thread = ServerThread(apps[0]).start()
    try:
        with openai_client(thread) as client:
            cards = {m.id: m.parent for m in client.models.list().data}
            assert cards == {NAME: None, **{name: NAME for name in demo_adapters}}
            reply = client.chat.completions.create(model="shout", max_tokens=16, temperature=0,
                                                   messages=[{"role": "user", "content": "Tell me about owls."}])
        assert BEHAVIOURS["shout"].holds(reply.choices[0].message.content)
    finally:
        thread.stop()
