"""Penalties, logit_bias and min_tokens through HTTP (openai client), against a reference computed here on
transformers' logits of the same weights: transformers' RepetitionPenaltyLogitsProcessor, and OpenAI's documented
presence / frequency formula, in vLLM's order (bias, min_tokens, repetition, frequency / presence). Greedy."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, RepetitionPenaltyLogitsProcessor

from tests.http.conftest import MODEL_NAME

PROMPT = [5, 17, 33, 9, 120, 7, 64, 3, 200, 41, 17, 33]
STEPS = 12


@pytest.fixture(scope="module")
def hf(demo_dir):
    model = AutoModelForCausalLM.from_pretrained(demo_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(demo_dir)


def reference(model, prompt: list[int], steps: int, *, presence: float = 0.0, frequency: float = 0.0,
              repetition: float = 1.0, bias: dict[int, float] | None = None, min_tokens: int = 0,
              eos: int | None = None) -> list[int]:
    """Greedy tokens with the processing applied to transformers' logits, stopping at `eos` (if given)."""
    ids, out = list(prompt), []
    repetition_processor = RepetitionPenaltyLogitsProcessor(repetition) if repetition != 1.0 else None
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            for token, value in (bias or {}).items():
                logits[token] += value
            if eos is not None and len(out) < min_tokens:
                logits[eos] = float("-inf")
            if repetition_processor is not None:
                logits = repetition_processor(torch.tensor([ids]), logits[None])[0]
            for token, count in Counter(out).items():       # OpenAI: count * frequency + (count > 0) * presence
                logits[token] -= count * frequency + presence
            token = int(logits.argmax())
            out.append(token)
            ids.append(token)
            if token == eos:
                break
    return out


def served_tokens(client, **kw) -> tuple[list[int], str]:
    extra = {"return_tokens_as_token_ids": True, **kw.pop("extra_body", {})}
    kw = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": STEPS, "temperature": 0, "logprobs": 0,
          "extra_body": extra, **kw}
    choice = client.completions.create(**kw).choices[0]
    return [int(t.removeprefix("token_id:")) for t in choice.logprobs.tokens], choice.finish_reason


CASES = {
    "presence": dict(presence_penalty=1.5),
    "frequency": dict(frequency_penalty=1.2),
    "negative-frequency": dict(frequency_penalty=-0.7),
    "repetition": dict(extra_body={"repetition_penalty": 1.8}),
    "logit_bias": dict(logit_bias={"7": 6.0, "33": -100, "500": 4.5}),
    "all": dict(presence_penalty=0.5, frequency_penalty=0.6, logit_bias={"12": 3.0},
                extra_body={"repetition_penalty": 1.3}),
}


def reference_kwargs(kw: dict) -> dict:
    extra = kw.get("extra_body", {})
    return dict(presence=kw.get("presence_penalty", 0.0), frequency=kw.get("frequency_penalty", 0.0),
                repetition=extra.get("repetition_penalty", 1.0),
                bias={int(k): v for k, v in kw.get("logit_bias", {}).items()})


@pytest.mark.parametrize("name", list(CASES))
def test_processing_equals_the_transformers_reference(hf, openai_client, name):
    model, _ = hf
    kw = CASES[name]
    plain = reference(model, PROMPT, STEPS)
    expected = reference(model, PROMPT, STEPS, **reference_kwargs(kw))
    assert expected != plain                               # the case really changes the greedy output
    tokens, _ = served_tokens(openai_client, extra_body={"ignore_eos": True, **kw.get("extra_body", {})},
                              **{k: v for k, v in kw.items() if k != "extra_body"})
    assert tokens == expected


def test_penalised_requests_beside_plain_ones_and_each_other(hf, openai_client):
    """A batch mixing cases (a list of prompts runs them together) gives each its own reference."""
    model, _ = hf
    kw = CASES["all"]
    expected = reference(model, PROMPT, STEPS, **reference_kwargs(kw))
    batch = openai_client.completions.create(
        model=MODEL_NAME, prompt=[PROMPT, PROMPT[:6], PROMPT], max_tokens=STEPS, temperature=0, logprobs=0,
        presence_penalty=0.5, frequency_penalty=0.6, logit_bias={"12": 3.0},
        extra_body={"repetition_penalty": 1.3, "return_tokens_as_token_ids": True, "ignore_eos": True})
    ids = [[int(t.removeprefix("token_id:")) for t in c.logprobs.tokens] for c in batch.choices]
    assert ids[0] == ids[2] == expected
    assert ids[1] == reference(model, PROMPT[:6], STEPS, **reference_kwargs(kw))
    assert served_tokens(openai_client, extra_body={"ignore_eos": True})[0] == reference(model, PROMPT, STEPS)


def test_min_tokens_masks_eos_until_reached(hf, openai_client):
    model, tokenizer = hf
    eos = tokenizer.eos_token_id
    bias = {str(eos): 100.0}                          # EOS is the greedy choice at every step
    tokens, reason = served_tokens(openai_client, logit_bias=bias)
    assert tokens == [eos] and reason == "stop"
    tokens, reason = served_tokens(openai_client, logit_bias=bias, extra_body={"min_tokens": 5})
    assert tokens == reference(model, PROMPT, STEPS, bias={eos: 100.0}, min_tokens=5, eos=eos)
    assert len(tokens) == 6 and tokens[-1] == eos and eos not in tokens[:5] and reason == "stop"


def test_chat_takes_penalties_and_logit_bias(openai_client):
    messages = [{"role": "user", "content": "Say something"}]
    plain = openai_client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=8, temperature=0)
    biased = openai_client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=8,
                                                   temperature=0, frequency_penalty=2.0, presence_penalty=2.0,
                                                   logit_bias={"7": 50})
    assert biased.choices[0].message.content != plain.choices[0].message.content
