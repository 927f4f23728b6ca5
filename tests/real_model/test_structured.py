"""Structured output on the default model through HTTP with the openai client (issue #14): JSON schema outputs
validate (jsonschema) for 20 concurrent requests with and without the demo adapters, json_object parses, regex
and choice outputs match, unconstrained requests in the same batch are unchanged, a constrained greedy request
equals transformers' argmax over the tokens llguidance's own matcher allows, and bad schemas / regexes are 400s."""
from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest
import torch
import llguidance
import llguidance.hf
import llguidance.numpy
from transformers import AutoModelForCausalLM, AutoTokenizer

from server.default_model import NAME
from server.demo_adapters import chat_prompt_ids
from tests.real_model.test_real_model import openai_client

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 16},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
NAMES = ["Alice", "Bob", "Chen", "Dana", "Emeka", "Farah", "Goran", "Hiro", "Ines", "Jonas",
         "Kemal", "Lena", "Mateo", "Nia", "Olga", "Pavel", "Quinn", "Rosa", "Sven", "Tariq"]
MODELS = [NAME, "shout", "json", "brief", "pirate", "cheer", "signoff", "title"]
REGEX = r"[0-9]{3}-[a-z]{2,5}"
CHOICES = ["red", "green", "blue"]
PLAIN = ["What is the capital of France?", "Name three primary colors."]
MAX_TOKENS = 48
PLAIN_TOKENS = 16


def _chat(server, model: str, question: str, max_tokens: int, **extra):
    with openai_client(server) as client:
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                               max_tokens=max_tokens, temperature=0, **extra)
    return reply.choices[0]


def _person(i: int) -> dict:
    """Request i: a json_schema request (response_format, or vLLM's guided_json for every third), model i % 8."""
    question = f"Describe a person called {NAMES[i]} as JSON with name, age and city."
    if i % 3 == 2:
        extra = {"extra_body": {"guided_json": PERSON}}
    else:
        extra = {"response_format": {"type": "json_schema",
                                     "json_schema": {"name": "person", "schema": PERSON, "strict": True}}}
    return dict(model=MODELS[i % len(MODELS)], question=question, max_tokens=MAX_TOKENS, **extra)


def test_one_concurrent_batch_of_constrained_and_plain_requests(real_server):
    """20 json_schema requests over the base and every demo adapter, a json_object, a regex and a choice request,
    and plain requests, all at once: each constrained output matches its constraint and ends cleanly ("stop"),
    and each plain request gives exactly the reply it gives alone."""
    requests = [_person(i) for i in range(len(NAMES))]
    requests.append(dict(model="shout", question="Reply in JSON: what color is the sea?", max_tokens=2 * MAX_TOKENS,
                         response_format={"type": "json_object"}))
    requests.append(dict(model=NAME, question="Invent a product code.", max_tokens=MAX_TOKENS,
                         extra_body={"guided_regex": REGEX}))
    requests.append(dict(model="pirate", question="What color is the sky?", max_tokens=MAX_TOKENS,
                         extra_body={"guided_choice": CHOICES}))
    plain = [dict(model=model, question=q, max_tokens=PLAIN_TOKENS) for q in PLAIN for model in (NAME, "shout")]
    everything = requests + plain
    with ThreadPoolExecutor(len(everything)) as pool:
        choices = list(pool.map(lambda r: _chat(real_server, **r), everything))
    people = choices[:len(NAMES)]
    for i, choice in enumerate(people):
        assert choice.finish_reason == "stop", (i, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    assert len({c.message.content for c in people}) > 5          # the constraint does not fix the content
    json_object, regex, choice = choices[len(NAMES):len(requests)]
    assert json_object.finish_reason == "stop", json_object.message.content
    assert isinstance(json.loads(json_object.message.content), dict)
    assert regex.finish_reason == "stop" and re.fullmatch(REGEX, regex.message.content), regex.message.content
    assert choice.finish_reason == "stop" and choice.message.content in CHOICES, choice.message.content
    alone = [_chat(real_server, **r) for r in plain]
    for together, single in zip(choices[len(requests):], alone):
        assert together.message.content == single.message.content
        assert together.finish_reason == single.finish_reason
        assert not together.message.content.lstrip().startswith("{")


def test_adapters_change_constrained_outputs(real_server):
    """The same json_schema request differs between the base and an adapter (the adapter is applied under a
    grammar too)."""
    outputs = {model: _chat(real_server, **{**_person(0), "model": model}).message.content
               for model in (NAME, "shout")}
    for text in outputs.values():
        jsonschema.validate(json.loads(text), PERSON)
    assert outputs[NAME] != outputs["shout"]


@pytest.fixture(scope="module")
def hf_model(real_model_dir):
    return AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32).eval()


def _reference_constrained_greedy(model, prompt: list[int], matcher, max_tokens: int) -> list[int]:
    """transformers' logits, llguidance's matcher and its own bitmask kernel: greedy over the allowed tokens
    until the matcher stops (grammar complete, or EOS taken)."""
    bitmask = llguidance.numpy.allocate_token_bitmask(1, model.config.vocab_size)
    ids, out = list(prompt), []
    for _ in range(max_tokens):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[:, -1].float().numpy()
        llguidance.numpy.fill_next_token_bitmask(matcher, bitmask)
        llguidance.numpy.apply_token_bitmask_inplace(logits, bitmask)
        token = int(logits.argmax())
        out.append(token)
        assert matcher.consume_token(token), matcher.get_error()
        if matcher.is_stopped():
            break
        ids.append(token)
    return out


@pytest.mark.parametrize("kind", ["json_schema", "regex"])
def test_constrained_greedy_equals_reference(real_server, real_model_dir, hf_model, kind):
    """A constrained greedy request's tokens == argmax of transformers' logits over the tokens an llguidance
    matcher (built here, from the library alone) allows, step by step until it stops."""
    tokenizer = AutoTokenizer.from_pretrained(real_model_dir)
    ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=hf_model.config.vocab_size)
    if kind == "json_schema":
        # one line, ", " and ": " separators: the documented output form
        grammar = llguidance.LLMatcher.grammar_from_json_schema(PERSON, defaults={
            "whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
        request = _person(0) | {"model": NAME}
    else:
        grammar = llguidance.LLMatcher.grammar_from_regex(REGEX)
        request = dict(model=NAME, question="Invent a product code.", max_tokens=MAX_TOKENS,
                       extra_body={"guided_regex": REGEX})
    matcher = llguidance.LLMatcher(ll_tokenizer, grammar)
    tokens = _reference_constrained_greedy(hf_model, chat_prompt_ids(tokenizer, request["question"]), matcher,
                                           MAX_TOKENS)
    assert matcher.is_stopped() and len(tokens) < MAX_TOKENS
    choice = _chat(real_server, **request)
    assert choice.finish_reason == "stop"
    assert choice.message.content == tokenizer.decode(tokens, skip_special_tokens=True)


@pytest.mark.parametrize("extra, param, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "response_format.json_schema.schema", "strin"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "string", "minLength": 5, "maxLength": 2}}}}, "response_format.json_schema.schema", "minLength"),
    ({"extra_body": {"guided_json": "{not json"}}, "guided_json", "not valid JSON"),
    ({"extra_body": {"guided_regex": "(ab"}}, "guided_regex", "unclosed group"),
    ({"extra_body": {"guided_grammar": "start: missing"}}, "guided_grammar", "missing"),
    ({"extra_body": {"guided_choice": []}}, "guided_choice", "guided_choice"),
    ({"response_format": {"type": "xml"}}, "response_format.type", "xml"),
    ({"response_format": {"type": "json_object"}, "extra_body": {"guided_regex": "a+"}}, "guided_regex",
     "only one of"),
])
def test_bad_constraints_are_400s(real_server, extra, param, words):
    with pytest.raises(openai.BadRequestError) as info:
        _chat(real_server, NAME, "Hi", 8, **extra)
    error = info.value.body
    assert error["param"] == param and words in error["message"], error
    body = {**extra.get("extra_body", {}), **({"response_format": extra["response_format"]}
                                              if "response_format" in extra else {})}
    with openai_client(real_server) as client:           # text completions take the same fields
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model=NAME, prompt="Hi", max_tokens=4, extra_body=body)
    assert info.value.body["param"] == param
    assert _chat(real_server, NAME, "Hi", 2).message.content        # and the server goes on


def test_text_completions_take_the_constraints(real_server):
    with openai_client(real_server) as client:
        choice = client.completions.create(model="brief", prompt="The sky is", max_tokens=8, temperature=0.9,
                                           seed=3, extra_body={"guided_choice": CHOICES}).choices[0]
        assert choice.text in CHOICES and choice.finish_reason == "stop"
        choice = client.completions.create(model=NAME, prompt="A person as JSON:", max_tokens=MAX_TOKENS,
                                           extra_body={"response_format": {"type": "json_schema", "json_schema": {
                                               "name": "person", "schema": PERSON}}}).choices[0]
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.text), PERSON)
