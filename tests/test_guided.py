"""Structured output without the real model: request fields -> GuidedSpec, grammar compile errors and the cache
bound, the bitmask unpacking against llguidance's own kernel, and the engine on a tiny random Llama (constrained
rows obey their grammar and end with a stop token; unconstrained rows in the same batch are unchanged)."""
from __future__ import annotations

import json
import re

import pytest
import torch
import llguidance
import llguidance.numpy
import numpy as np

from server.config import EngineConfig
from server.engine import LLMEngine
from server.guided import GrammarCache, GuidedSpec, guided_spec
from server.guided_decoding import unpack_bitmask
from server.sampling import ParamError, SamplingParams

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["a"], "additionalProperties": False}


def test_request_fields_to_specs():
    assert guided_spec() is None
    assert guided_spec({"type": "text"}) is None
    assert guided_spec({"type": "json_object"}) == GuidedSpec("json_object")
    spec = guided_spec({"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA, "strict": True}})
    assert (spec.kind, json.loads(spec.spec), spec.strict) == ("json_schema", SCHEMA, True)
    assert guided_spec(guided_json=json.dumps(SCHEMA)).spec == guided_spec(guided_json=SCHEMA).spec
    assert guided_spec(guided_regex="a+") == GuidedSpec("regex", "a+", "guided_regex")
    assert json.loads(guided_spec(guided_choice=["x", "y", "x"]).spec) == ["x", "y"]
    assert guided_spec(guided_grammar='root ::= "a"').kind == "grammar"


@pytest.mark.parametrize("kwargs, param", [
    (dict(response_format={"type": "json_object"}, guided_regex="a"), "guided_regex"),
    (dict(guided_json=SCHEMA, guided_choice=["a"]), "guided_choice"),
    (dict(response_format={"type": "yaml"}), "response_format.type"),
    (dict(response_format={"type": "json_schema"}), "response_format.json_schema"),
    (dict(response_format={"type": "json_schema", "json_schema": {"schema": {}, "strict": "yes"}}),
     "response_format.json_schema.strict"),
    (dict(guided_json="[1, 2]"), "guided_json"),
    (dict(guided_json="{"), "guided_json"),
    (dict(guided_regex=""), "guided_regex"),
    (dict(guided_choice=["a", ""]), "guided_choice"),
    (dict(guided_grammar="  "), "guided_grammar"),
])
def test_bad_request_fields(kwargs, param):
    with pytest.raises(ParamError) as info:
        guided_spec(**kwargs)
    assert info.value.param == param


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def grammars(tokenizer):
    return GrammarCache(tokenizer, 512, [2])


@pytest.mark.parametrize("spec, words", [
    (GuidedSpec("json_schema", '{"type": "strin"}'), "Invalid type: strin"),
    (GuidedSpec("json_schema", '{"type": "object", "required": "a"}'), "Expected array for 'required'"),
    (GuidedSpec("json_schema", '{"$ref": "#/defs/x"}'), "'/defs/x' does not exist"),
    (GuidedSpec("regex", "(ab", "guided_regex"), "unclosed group"),
    (GuidedSpec("regex", "a{3,1}", "guided_regex"), "invalid repetition count range"),
    (GuidedSpec("grammar", "start: x", "guided_grammar"), 'unknown name: "x"'),
    (GuidedSpec("grammar", "root ::= x", "guided_grammar"), "x"),
])
def test_compile_errors_name_the_field_and_the_reason(grammars, spec, words):
    with pytest.raises(ParamError) as info:
        grammars.compile(spec)
    assert info.value.param == spec.param and words in str(info.value)
    assert "\n" not in str(info.value)


def test_cache_is_bounded_and_reuses(tokenizer):
    cache = GrammarCache(tokenizer, 512, [2], max_size=2)
    specs = [GuidedSpec("regex", r, "guided_regex") for r in ("a+", "b+", "c+")]
    first = cache.compile(specs[0])
    assert cache.compile(specs[0]) is first
    for spec in specs[1:]:
        cache.compile(spec)
    assert len(cache) == 2
    assert cache.compile(specs[0]) is not first       # dropped (least recently used), compiled again


def _accepts(grammars, spec: GuidedSpec, tokenizer, text: str) -> bool:
    """llguidance's own matcher: does the grammar take `text` (as the tokenizer splits it) and then end?"""
    matcher = grammars.matcher(spec)
    tokens = tokenizer.encode(text, add_special_tokens=False)
    return matcher.consume_tokens(tokens) and matcher.is_accepting() if tokens else matcher.is_accepting()


def test_choice_grammar_takes_exactly_the_choices(grammars, tokenizer):
    """Choices with quotes, backslashes, newlines and non-ASCII come out verbatim; nothing else is accepted."""
    choices = ['say "hi"', "back\\slash", "two\nlines", "café", "a"]
    spec = guided_spec(guided_choice=choices)
    for text in choices + ["ab", 'say "hi', "cafe", "A"]:
        assert _accepts(grammars, spec, tokenizer, text) == (text in choices), text


def test_gbnf_and_lark_grammars(grammars, tokenizer):
    for grammar in ('root ::= "a" ("b" | "c")*', 'start: "a" ("b" | "c")*'):
        spec = guided_spec(guided_grammar=grammar)
        assert _accepts(grammars, spec, tokenizer, "abcb") and not _accepts(grammars, spec, tokenizer, "abd")


def test_unpack_bitmask_matches_llguidance_kernel():
    g = torch.Generator().manual_seed(0)
    vocab = 1000                                        # not a multiple of 32
    bitmask = torch.randint(-2**31, 2**31 - 1, (3, (vocab + 31) // 32), generator=g, dtype=torch.int64)
    bitmask = bitmask.to(torch.int32)
    logits = torch.randn(3, vocab, generator=g)
    expected = logits.numpy().copy()
    llguidance.numpy.apply_token_bitmask_inplace(expected, bitmask.numpy())
    assert torch.equal(unpack_bitmask(bitmask, vocab), torch.from_numpy(np.isfinite(expected)))


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return LLMEngine(EngineConfig(model=str(tiny_model_dir("llama")), kv_cache_memory="16MiB"))


def _text(engine, tokens: list[int]) -> str:
    return engine.tokenizer.decode(tokens, skip_special_tokens=True)


def test_engine_mixed_batch(engine):
    """Constrained greedy and sampled rows match their grammar and end with EOS ("stop"); unconstrained rows of
    the same batch give the tokens they give alone."""
    eos = engine.tokenizer.eos_token_id
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16], [17, 18], [19, 20, 21], [22, 23]]
    plain = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=12, temperature=1.0, seed=7, ignore_eos=True)
    params = [
        SamplingParams(max_tokens=40, temperature=0.0, guided=guided_spec(guided_json=SCHEMA)),
        plain,
        SamplingParams(max_tokens=40, temperature=0.9, seed=1, guided=guided_spec(guided_regex="[a-c]{2,4}x")),
        sampled,
        SamplingParams(max_tokens=40, temperature=0.0, guided=guided_spec(guided_choice=["yes", "no"])),
        SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True,
                       guided=guided_spec(guided_grammar='root ::= "[" ("0" | "1")+ "]"')),
    ]
    together = engine.generate(prompts, params)
    assert json.loads(_text(engine, together[0])).keys() == {"a"}
    assert re.fullmatch("[a-c]{2,4}x", _text(engine, together[2]))
    assert _text(engine, together[4]) in ("yes", "no")
    assert re.fullmatch(r"\[[01]+\]", _text(engine, together[5]))     # ignore_eos: the grammar still ends it
    for i in (0, 2, 4, 5):                      # ended by the grammar: complete, or EOS where it may end
        assert together[i][-1] == eos or len(together[i]) < 40
    for i in (1, 3):
        assert together[i] == engine.generate([prompts[i]], params[i])[0]
        assert len(together[i]) == 12
    assert not engine.guided._matchers                      # every grammar state freed


def test_logprobs_are_the_models_own(engine):
    """A constrained request reports the model's logprobs, before the mask: its first token's top alternatives
    equal those of the same prompt unconstrained (same logits), and are all finite."""
    prompt = [30, 31, 32]
    constrained = SamplingParams(max_tokens=4, temperature=0.0, logprobs=3, guided=guided_spec(guided_choice=["x"]))
    free = SamplingParams(max_tokens=1, temperature=0.0, logprobs=3)
    engine.add_request("c", prompt, constrained)
    engine.add_request("f", prompt, free)
    first = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.logprobs and out.request_id not in first:
                first[out.request_id] = out.logprobs[0]
    assert first["c"].top == first["f"].top
    assert all(lp > float("-inf") for _, lp in first["c"].top)
    assert engine.tokenizer.decode([first["c"].token_id]) == "x"


def test_n_samples_each_follow_the_grammar(engine):
    """n=4 samples of one constrained prompt (forked after its prefill, sharing its first mask): each follows
    the grammar on its own state, and the first equals the same request with n=1 (same seed)."""
    regex = "[a-e]{3,6}"
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=5, n=4, guided=guided_spec(guided_regex=regex))
    engine.add_request("n4", [40, 41, 42], params)
    texts: dict[int, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            assert out.error is None
            texts.setdefault(out.index, []).extend(out.token_ids)
    assert sorted(texts) == [0, 1, 2, 3]
    for tokens in texts.values():
        assert re.fullmatch(regex, _text(engine, tokens)), _text(engine, tokens)
    assert len({tuple(t) for t in texts.values()}) > 1
    single = engine.generate([[40, 41, 42]], SamplingParams(max_tokens=12, temperature=1.0, seed=5,
                                                            guided=guided_spec(guided_regex=regex)))[0]
    assert texts[0] == single
    assert not engine.guided._matchers


def test_fork_waits_for_the_parents_mask_under_way(grammars, monkeypatch):
    """n > 1 forks a request's grammar state after the forward, while the worker may still be computing its mask:
    the copy must not touch the matcher then (llguidance raises "Already mutably borrowed", failing the step)."""
    import threading
    import time
    from server.guided_decoding import GuidedDecoding

    busy = threading.Event()

    class Matcher:                     # stands in for llguidance.LLMatcher: copying it while the worker has it fails
        def deep_copy(self):
            if busy.is_set():
                raise RuntimeError("Already mutably borrowed")
            return Matcher()

    def slow_fill(matchers, bitmask):
        busy.set()
        time.sleep(0.3)
        busy.clear()

    guided = GuidedDecoding(grammars)
    monkeypatch.setattr(guided, "_fill", slow_fill)
    guided._matchers["parent"] = Matcher()
    masks = guided.start(["parent"])
    while not busy.is_set():           # the worker holds the parent's matcher
        time.sleep(0.001)
    guided.fork("parent", "child")
    assert isinstance(guided._matchers["child"], Matcher)
    assert masks.rows["child"] == masks.rows["parent"]
    guided.close()
