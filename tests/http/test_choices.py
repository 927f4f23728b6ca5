"""n, best_of, lists of prompts and streamed choices through HTTP with the openai client (issue #14)."""
from __future__ import annotations

import time

import openai
import pytest

from tests.http.conftest import MODEL_NAME

PROMPTS = ["The quick brown fox", "Once upon a time", "def main(", "Hello"]


def completion(client, **kw):
    kw = {"model": MODEL_NAME, "max_tokens": 8, "extra_body": {"ignore_eos": True}, **kw}
    return client.completions.create(**kw)


def prefill_tokens(server) -> int:
    return server.engine.stats()["num_prefill_tokens"]


def test_n_seeded_samples_are_reproducible_and_share_one_prefill(server, openai_client):
    before = prefill_tokens(server)
    first = completion(openai_client, prompt=PROMPTS[0], n=3, seed=11, temperature=1.0)
    num_prompt = first.usage.prompt_tokens
    assert prefill_tokens(server) - before == num_prompt          # one prefill for the 3 samples
    assert [c.index for c in first.choices] == [0, 1, 2]
    texts = [c.text for c in first.choices]
    assert len(set(texts)) == 3                                     # they are 3 different samples
    again = completion(openai_client, prompt=PROMPTS[0], n=3, seed=11, temperature=1.0)
    assert [c.text for c in again.choices] == texts
    assert first.usage.completion_tokens == 3 * 8
    alone = completion(openai_client, prompt=PROMPTS[0], seed=11, temperature=1.0)
    assert alone.choices[0].text == texts[0]                        # sample 0 is the n=1 request


def test_a_list_of_prompts_gives_the_choices_of_single_requests(openai_client):
    batch = completion(openai_client, prompt=PROMPTS, temperature=0)
    singles = [completion(openai_client, prompt=p, temperature=0) for p in PROMPTS]
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert [c.text for c in batch.choices] == [s.choices[0].text for s in singles]
    assert batch.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)
    assert batch.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)
    ids = [[5, 17, 33, 9], [100, 200], [7]]
    by_ids = completion(openai_client, prompt=ids, temperature=0)
    assert [c.text for c in by_ids.choices] == [completion(openai_client, prompt=p, temperature=0).choices[0].text
                                                for p in ids]
    assert completion(openai_client, prompt=ids[0], temperature=0).choices[0].text == by_ids.choices[0].text


def test_prompts_times_n_are_indexed_prompt_major(openai_client):
    batch = completion(openai_client, prompt=PROMPTS[:2], n=2, seed=3, temperature=1.0)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    for p, prompt in enumerate(PROMPTS[:2]):
        one = completion(openai_client, prompt=prompt, n=2, seed=3, temperature=1.0)
        assert [c.text for c in batch.choices[2 * p:2 * p + 2]] == [c.text for c in one.choices]


def test_streamed_choices_carry_their_index_and_match_the_response(openai_client):
    kw = dict(prompt=PROMPTS[:2], n=2, seed=5, temperature=1.0)
    whole = completion(openai_client, **kw)
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    usage = None
    for chunk in completion(openai_client, stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            assert usage is None and not chunk.choices
            usage = chunk.usage
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    assert texts == {c.index: c.text for c in whole.choices}
    assert finish == {c.index: c.finish_reason for c in whole.choices}
    assert usage == whole.usage


def test_chat_n_streamed_and_not(openai_client):
    messages = [{"role": "user", "content": "Tell me a story"}]
    whole = openai_client.chat.completions.create(model=MODEL_NAME, messages=messages, n=3, seed=9,
                                                  temperature=1.0, max_tokens=6)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    assert len({c.message.content for c in whole.choices}) > 1
    contents: dict[int, str] = {}
    roles: dict[int, str] = {}
    usage = None
    stream = openai_client.chat.completions.create(model=MODEL_NAME, messages=messages, n=3, seed=9,
                                                   temperature=1.0, max_tokens=6, stream=True,
                                                   stream_options={"include_usage": True})
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            if choice.delta.role:
                roles[choice.index] = choice.delta.role
            contents[choice.index] = contents.get(choice.index, "") + (choice.delta.content or "")
    assert roles == {0: "assistant", 1: "assistant", 2: "assistant"}
    assert contents == {c.index: c.message.content for c in whole.choices}
    assert usage == whole.usage


def test_best_of_returns_the_n_most_likely_samples(openai_client):
    """best_of=4, n=2: the two returned are the two of the 4 samples (= n=4 with the same seed) with the highest
    cumulative logprob, best first."""
    all4 = completion(openai_client, prompt=PROMPTS[1], n=4, seed=21, temperature=1.0, logprobs=0)
    totals = sorted(((sum(c.logprobs.token_logprobs), c.text) for c in all4.choices), reverse=True)
    best = completion(openai_client, prompt=PROMPTS[1], n=2, best_of=4, seed=21, temperature=1.0)
    assert [c.text for c in best.choices] == [text for _, text in totals[:2]]
    assert [c.index for c in best.choices] == [0, 1]


@pytest.mark.parametrize("kw, param", [
    (dict(n=0), "n"), (dict(n=129), "n"), (dict(n=3, best_of=2), "best_of"),
    (dict(prompt=PROMPTS * 40, n=1), "prompt"), (dict(prompt=PROMPTS, n=40), "n"),
    (dict(best_of=3, n=1, stream=True), "best_of"),
    (dict(presence_penalty=2.5), "presence_penalty"), (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(extra_body={"repetition_penalty": 0}), "repetition_penalty"),
    (dict(logit_bias={"5": 101}), "logit_bias"), (dict(logit_bias={"hello": 1}), "logit_bias"),
    (dict(logit_bias={"99999": 1}), "logit_bias"),
    (dict(extra_body={"min_tokens": 9}), "min_tokens"), (dict(extra_body={"min_tokens": -1}), "min_tokens"),
])
def test_bad_values_are_400s(openai_client, kw, param):
    kw = {"prompt": PROMPTS[0], **kw}
    with pytest.raises(openai.BadRequestError) as info:
        if kw.pop("stream", False):
            list(completion(openai_client, stream=True, **kw))
        else:
            completion(openai_client, **kw)
    assert info.value.body["param"] == param, info.value.body
    assert completion(openai_client, prompt="still serving").choices[0].text is not None


def test_disconnecting_a_streamed_n_request_frees_every_block(gated_server):
    """A client leaving mid-stream aborts all its samples: every KV block comes back, long before the samples
    could have finished on their own (400 steps of >= 50 ms)."""
    engine = gated_server.engine
    blocks = engine.scheduler.blocks
    body = {"model": MODEL_NAME, "prompt": PROMPTS[0], "n": 3, "max_tokens": 400, "temperature": 1.0,
            "stream": True, "ignore_eos": True}
    engine.step_delay = 0.05
    try:
        with gated_server.client(headers={"Authorization": "Bearer sekret"}) as http:
            with http.stream("POST", "/v1/completions", json=body) as response:
                assert next(response.iter_lines()).startswith("data: ")
                assert blocks.num_used > 0 and len(engine.requests) == 3
            deadline = time.monotonic() + 5
            while (blocks.num_used or engine.requests) and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        engine.step_delay = 0.0
    assert blocks.num_used == 0 and set(blocks.ref_counts) == {0} and not engine.samples
