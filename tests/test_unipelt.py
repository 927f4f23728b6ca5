"""UniPELT (AdapterHub ConfigUnion: prefix tuning + SeqBn + LoRA) vs AdapterHub 1.3.0 itself (tests/fixtures/
adapterhub, cases `unipelt` and `unipelt_ungated`).

Ungated (`use_gating=False`): every generated token identical and every row of logits within 1e-4.
Gated (UniPELTConfig): AdapterHub averages each gate over the whole sequence, so its generation re-gates the whole
sequence at every token, which no KV-cached server can match; we take the gates over the prompt at prefill and
keep them (adapters/gates.py). Only row 0 (the prompt's forward, which is where the gates are taken) is
AdapterHub's; the rest of a gated generation is checked mixed == solo.
Both solo and in one staggered, chunked batch with PEFT LoRA, an AdapterHub bottleneck and base requests.
"""
from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from adapters.config import (ADAPTERHUB_LORA, ADAPTERHUB_LORA_GATED, ADAPTERHUB_PREFIX, ADAPTERHUB_PREFIX_GATED,
                             ADAPTERHUB_UNION, BOTTLENECK, BOTTLENECK_GATED, detect_kind)
from server.config import EngineConfig
from server.engine import LLMEngine
from server.sampling import SamplingParams
from tests.test_adapterhub_vs_fixtures import Fixture, peft_adapters, run  # noqa: F401 (fixture)
from tests.test_model_vs_hf import ATOL

CASES = ["unipelt", "unipelt_ungated"]


@pytest.fixture(scope="module")
def fixture(tokenizer_dir, tmp_path_factory) -> Fixture:
    return Fixture("llama", tokenizer_dir, tmp_path_factory.mktemp("unipelt"))


def engine_with(fixture: Fixture, extra: dict | None = None, **kw) -> LLMEngine:
    kw = {"kv_cache_memory": "8MiB", "block_size": 4, **kw}
    engine = LLMEngine(EngineConfig(model=str(fixture.base), dtype="float32", **kw))
    for name in [*CASES, "seq_bn"]:
        engine.adapters.load(name, str(fixture.dir / name))
    for name, path in (extra or {}).items():
        engine.adapters.load(name, str(path))
    return engine


def test_kinds(fixture):
    assert detect_kind(str(fixture.dir / "unipelt")) == detect_kind(str(fixture.dir / "unipelt_ungated")) \
        == ADAPTERHUB_UNION
    engine = engine_with(fixture)
    gated, ungated = (engine.adapters.get(c) for c in CASES)
    assert gated.info["part_kinds"] == (ADAPTERHUB_PREFIX_GATED, BOTTLENECK_GATED, ADAPTERHUB_LORA_GATED)
    assert ungated.info["part_kinds"] == (ADAPTERHUB_PREFIX, BOTTLENECK, ADAPTERHUB_LORA)
    assert gated.info["num_virtual_tokens"] == ungated.info["num_virtual_tokens"] == 4


def test_each_alone(fixture):
    """Ungated: whole generations == AdapterHub. Gated: row 0 == AdapterHub's prompt forward. Each changes the
    output vs the base model, and the gates matter (gated != ungated)."""
    engine = engine_with(fixture)
    for i, prompt in enumerate(fixture.prompts):
        base_row0 = fixture.expected("base", i)[1][0]
        tokens, logits = run(engine, [(prompt, "unipelt_ungated", None, 0)], fixture.max_new)
        want_tokens, want_logits = fixture.expected("unipelt_ungated", i)
        assert tokens[0] == want_tokens, i
        torch.testing.assert_close(logits[0], want_logits, atol=ATOL, rtol=0, msg=f"ungated prompt {i}")
        assert (logits[0][0] - base_row0).abs().max() > 0.5
        tokens, logits = run(engine, [(prompt, "unipelt", None, 0)], fixture.max_new)
        assert len(tokens[0]) == fixture.max_new
        torch.testing.assert_close(logits[0][0], fixture.expected("unipelt", i)[1][0], atol=ATOL, rtol=0,
                                   msg=f"gated prompt {i} row 0")
        assert (logits[0][0] - base_row0).abs().max() > 0.5
        assert (logits[0][0] - want_logits[0]).abs().max() > 0.1


def test_mixed_batch_equals_solo(fixture, peft_adapters):
    """Both cases (twice each), an AdapterHub SeqBn, PEFT LoRA and base requests staggered with a 16-token budget
    (other prompts chunked; a gated prompt waits for a step with room for all of it) and a KV cache small
    enough to preempt: ungated == AdapterHub; gated: row 0 == AdapterHub and the whole generation == solo."""
    dirs, refs = peft_adapters
    solo = engine_with(fixture)
    gated_solo = [run(solo, [(p, "unipelt", None, 0)], fixture.max_new) for p in fixture.prompts]
    engine = engine_with(fixture, {"peft_lora": dirs["peft_lora"]}, max_num_batched_tokens=16, max_num_seqs=64,
                         kv_cache_memory="64KiB")
    requests, want = [], []
    for n, case in enumerate([*CASES, "seq_bn", "peft_lora", "base", *CASES]):
        for i, prompt in enumerate(fixture.prompts):
            requests.append((prompt, None if case == "base" else case, None, (n + 2 * i) % 5))
            if case == "unipelt":
                want.append((gated_solo[i][0][0], gated_solo[i][1][0]))
            elif case == "peft_lora":
                want.append(refs["peft_lora"][i])
            else:
                want.append(fixture.expected(case, i))
    tokens, logits = run(engine, requests, fixture.max_new)
    assert engine.num_preemptions > 0
    for (prompt, case, _, _), got_t, got_l, (want_t, want_l) in zip(requests, tokens, logits, want):
        assert got_t == want_t, (case, prompt)
        torch.testing.assert_close(got_l, want_l, atol=ATOL, rtol=0, msg=str(case))
        if case == "unipelt":
            i = fixture.prompts.index(prompt)
            torch.testing.assert_close(got_l[0], fixture.expected("unipelt", i)[1][0], atol=ATOL, rtol=0)


def test_forked_samples_share_the_prompts_gates(fixture):
    """n = 3 greedy samples of a gated request fork after its prefill and keep its gates: each equals one request."""
    engine = engine_with(fixture)
    prompt = fixture.prompts[1]
    want = engine.generate([prompt], SamplingParams(max_tokens=fixture.max_new, temperature=0.0, ignore_eos=True),
                           ["unipelt"])[0]
    engine.add_request("forked", prompt, SamplingParams(max_tokens=fixture.max_new, temperature=0.0, n=3,
                                                        ignore_eos=True), "unipelt")
    samples = defaultdict(list)
    while engine.has_unfinished():
        for out in engine.step():
            samples[out.index].extend(out.token_ids)
    assert len(samples) == 3 and all(tokens == want for tokens in samples.values())
    assert engine.num_prefill_tokens == 2 * len(prompt)        # one prefill per request, none per sample
