"""POST /v1/completions through a real server, checked against the engine driven directly."""
import pytest

from server.sampling import SamplingParams
from tests.http.conftest import MODEL_NAME

PROMPT = "def add(a, b):\n    return"
EXTRA = {"ignore_eos": True}          # random weights: don't let an early EOS shorten the comparisons


def greedy(openai_client, prompt=PROMPT, max_tokens=20, **kwargs):
    return openai_client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                            extra_body=EXTRA, **kwargs)


def test_greedy_equals_engine(openai_client, reference_engine):
    response = greedy(openai_client)
    prompt_ids = reference_engine.tokenizer.encode(PROMPT)
    [expected_ids] = reference_engine.generate([prompt_ids], SamplingParams(max_tokens=20, temperature=0,
                                                                            ignore_eos=True))
    choice = response.choices[0]
    assert choice.text == reference_engine.tokenizer.decode(expected_ids)
    assert choice.finish_reason == "length"
    assert response.model == MODEL_NAME and response.object == "text_completion"
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (len(prompt_ids), 20)
    assert response.usage.total_tokens == len(prompt_ids) + 20


def test_stream_concatenates_to_non_stream(openai_client):
    expected = greedy(openai_client).choices[0].text
    chunks = list(greedy(openai_client, stream=True, stream_options={"include_usage": True}))
    text_chunks = [c for c in chunks if c.choices]
    assert len(text_chunks) > 1
    assert "".join(c.choices[0].text for c in text_chunks) == expected
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert len({c.id for c in chunks}) == 1


def test_sse_wire_format(client):
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 3, "stream": True, **EXTRA}
    with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(event.startswith("data: {") for event in events[:-2])


def test_token_id_prompt_and_one_string_list(openai_client, reference_engine):
    expected = greedy(openai_client).choices[0].text
    prompt_ids = reference_engine.tokenizer.encode(PROMPT)
    assert greedy(openai_client, prompt=prompt_ids).choices[0].text == expected
    assert greedy(openai_client, prompt=[PROMPT]).choices[0].text == expected
    assert greedy(openai_client, prompt=[prompt_ids]).usage.prompt_tokens == len(prompt_ids)


def test_echo(openai_client, reference_engine):
    plain = greedy(openai_client).choices[0].text
    assert greedy(openai_client, echo=True).choices[0].text == PROMPT + plain
    prompt_ids = reference_engine.tokenizer.encode(PROMPT)
    assert greedy(openai_client, prompt=prompt_ids, echo=True).choices[0].text == PROMPT + plain
    streamed = greedy(openai_client, echo=True, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == PROMPT + plain


def test_logprobs(openai_client):
    response = greedy(openai_client, logprobs=3, max_tokens=10)
    choice = response.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 10
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 3 and logprob <= 0
        assert logprob == pytest.approx(max(top.values()), abs=1e-5)     # greedy picks the best
        assert top.get(token, logprob) == pytest.approx(logprob, abs=1e-5)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(10)]
    if "\ufffd" not in "".join(lp.tokens):
        assert "".join(lp.tokens) == choice.text

    streamed = [c.choices[0].logprobs for c in greedy(openai_client, logprobs=3, max_tokens=10, stream=True)]
    assert [t for s in streamed if s for t in s.tokens] == lp.tokens
    assert [o for s in streamed if s for o in s.text_offset] == lp.text_offset


def test_stop_string(openai_client):
    text = greedy(openai_client, max_tokens=30).choices[0].text
    stop = text[12:15]
    assert stop.strip(), f"pick another slice of {text!r}"
    response = greedy(openai_client, max_tokens=30, stop=[stop, "\x00never"])
    assert response.choices[0].text == text[:text.index(stop)]
    assert response.choices[0].finish_reason == "stop"
    streamed = greedy(openai_client, max_tokens=30, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text[:text.index(stop)]


def test_seed_reproducible_at_temperature_1(openai_client):
    def sample(seed):
        return openai_client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=1.0,
                                                seed=seed, extra_body=EXTRA).choices[0].text
    first = sample(1234)
    assert sample(1234) == first
    assert any(sample(seed) != first for seed in (1, 2, 3))


def test_top_k_1_is_greedy(openai_client):
    expected = greedy(openai_client).choices[0].text
    response = openai_client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=20, temperature=1.0,
                                                extra_body={**EXTRA, "top_k": 1})
    assert response.choices[0].text == expected
