"""POST /v1/chat/completions: the chat template, streaming shape, logprobs."""
from tests.http.conftest import MODEL_NAME

MESSAGES = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Sort a list."}]
EXTRA = {"ignore_eos": True}


def chat(openai_client, **kwargs):
    kwargs.setdefault("max_tokens", 12)
    return openai_client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, temperature=0,
                                                 extra_body=EXTRA, **kwargs)


def test_chat_is_a_completion_of_the_templated_prompt(openai_client, reference_engine):
    tokenizer = reference_engine.tokenizer
    templated = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert templated.endswith("<|im_start|>assistant\n")
    completion = openai_client.completions.create(model=MODEL_NAME, prompt=templated, max_tokens=12,
                                                  temperature=0, extra_body=EXTRA)
    response = chat(openai_client)
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == completion.choices[0].text
    assert choice.finish_reason == "length"
    assert response.object == "chat.completion" and response.id.startswith("chatcmpl-")
    assert response.usage.prompt_tokens == len(tokenizer.encode(templated, add_special_tokens=False))
    assert response.usage.completion_tokens == 12


def test_content_parts_and_max_completion_tokens(openai_client):
    expected = chat(openai_client, max_tokens=5).choices[0].message.content
    parts = [{"role": "system", "content": [{"type": "text", "text": "You write "}, {"type": "text", "text": "Python."}]},
             MESSAGES[1]]
    response = openai_client.chat.completions.create(model=MODEL_NAME, messages=parts, temperature=0,
                                                     max_completion_tokens=5, extra_body=EXTRA)
    assert response.choices[0].message.content == expected
    assert response.usage.completion_tokens == 5


def test_stream_shape(openai_client):
    expected = chat(openai_client).choices[0].message.content
    chunks = list(chat(openai_client, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    finish = chunks[-2].choices[0]
    assert finish.finish_reason == "length" and finish.delta.content is None
    body = chunks[1:-2]
    assert body and all(c.choices[0].finish_reason is None and c.choices[0].delta.role is None for c in body)
    assert "".join(c.choices[0].delta.content for c in body) == expected
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_logprobs(openai_client):
    response = chat(openai_client, logprobs=True, top_logprobs=2, max_tokens=6)
    entries = response.choices[0].logprobs.content
    assert len(entries) == 6
    for entry in entries:
        assert len(entry.top_logprobs) == 2
        assert entry.logprob == max(t.logprob for t in entry.top_logprobs)       # greedy
        assert entry.bytes == list(entry.token.encode())
    assert chat(openai_client, max_tokens=6).choices[0].logprobs is None
    streamed = [e for c in chat(openai_client, logprobs=True, top_logprobs=2, max_tokens=6, stream=True)
                if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in entries]


def test_no_max_tokens_fills_the_context(client, server):
    response = client.post("/v1/chat/completions", json={"model": MODEL_NAME, "messages": MESSAGES,
                                                         "temperature": 0, **EXTRA})
    usage = response.json()["usage"]
    assert response.status_code == 200
    assert usage["prompt_tokens"] + usage["completion_tokens"] == server.engine.max_model_len
    assert response.json()["choices"][0]["finish_reason"] == "length"


def test_no_chat_template_is_400(demo_dir):
    from tests.http.conftest import make_engine, serve
    engine = make_engine(demo_dir)
    engine.tokenizer.chat_template = None
    thread, served = serve(engine)
    try:
        with served.client() as http:
            response = http.post("/v1/chat/completions", json={"model": MODEL_NAME, "messages": MESSAGES})
            assert response.status_code == 400
            assert response.json()["error"]["param"] == "messages"
            assert "chat template" in response.json()["error"]["message"]
            completion = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "x", "max_tokens": 1})
            assert completion.status_code == 200
    finally:
        thread.stop()
