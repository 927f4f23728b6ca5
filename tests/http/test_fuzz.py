"""Fuzzing every endpoint from the server's own /openapi.json (hypothesis, derandomized so CI is repeatable):
bodies drawn from the documented request schemas, mostly with a real model / adapter name and small lengths so
they reach the engine, some with one field replaced by arbitrary JSON. Every answer is a documented status
below 500 with a body of the documented shape, and the server serves normally afterwards."""
from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.lifecycle import AdapterList
from server.openapi import ErrorResponse
from server.protocol import (ChatCompletionChunk, ChatCompletionResponse, CompletionResponse, Health, ModelList)
from tests.http.adapter_zoo import save_zoo
from tests.http.conftest import MODEL_NAME, TINY_MODEL, assert_serving, make_engine, serve
from tests.http.schema_strategies import ANY_JSON, from_schema

PRELOADED = ["lora-qv", "dora-ko", "prefix"]
NAMES = [MODEL_NAME, *PRELOADED, "lora-mlp", "prompt", "no-such-model"]     # lora-mlp, prompt: just in time
RESPONSE_MODELS = {"/v1/completions": (CompletionResponse, CompletionResponse),
                   "/v1/chat/completions": (ChatCompletionResponse, ChatCompletionChunk)}

def fuzz_settings(max_examples: int) -> settings:
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def fuzz_server(demo_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    dirs = save_zoo(demo_dir, root, names={*PRELOADED, "lora-mlp", "prompt"})
    engine = make_engine(demo_dir, max_model_len=256)
    for name in PRELOADED:
        engine.adapters.load(name, str(dirs[name]))
    thread, served = serve(engine, adapter_dirs=[str(root)])
    with served.client() as http:
        yield served, http.get("/openapi.json").json(), http
    thread.stop()


def realistic(body: dict, draw, chat: bool) -> dict:
    """Names the engine knows and lengths that run in milliseconds, so the request reaches the engine."""
    body["model"] = draw(st.sampled_from(NAMES))
    if "adapter_id" in body:
        body["adapter_id"] = draw(st.sampled_from(NAMES[1:]))
    for field in ("max_tokens", "max_completion_tokens"):
        if field in body or chat:
            body[field] = draw(st.integers(1, 8))
    if isinstance(body.get("prompt"), list) and body["prompt"] and isinstance(body["prompt"][0], int):
        body["prompt"] = draw(st.lists(st.integers(0, TINY_MODEL["vocab_size"] - 1), min_size=1, max_size=8))
    if "adapter_drop" in body:
        body["adapter_drop"] = draw(st.integers(0, TINY_MODEL["num_layers"] + 1))
    constraints = [body.pop(field, None) for field in GUIDED_FIELDS]
    if any(c is not None for c in constraints):          # at most one constraint, a real one
        body.update(draw(st.sampled_from(GUIDED)))
    if isinstance(body.get("prompt"), list) and len(body["prompt"]) > 3 and not isinstance(body["prompt"][0], int):
        body["prompt"] = body["prompt"][:3]
    for field in ("n", "best_of"):
        if field in body:
            body[field] = draw(st.integers(1, 3))
    if "logit_bias" in body:
        body["logit_bias"] = draw(st.dictionaries(st.integers(0, TINY_MODEL["vocab_size"] - 1).map(str),
                                                  st.floats(-100, 100), max_size=3))
    if "min_tokens" in body:
        body["min_tokens"] = draw(st.integers(0, body.get("max_tokens") or 1))
    return body


GUIDED_FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar")
GUIDED = [{"response_format": {"type": "text"}}, {"response_format": {"type": "json_object"}},
          {"guided_json": {"type": "object", "properties": {"a": {"type": "integer"}}}},
          {"guided_regex": "[a-z]{1,4}"}, {"guided_choice": ["yes", "no"]}, {"guided_grammar": 'root ::= "a"+'}]


def bodies(spec: dict, path: str) -> st.SearchStrategy:
    schema = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]

    @st.composite
    def build(draw):
        body = draw(from_schema(schema, spec))
        # hypothesis favours small integers, so "!= 3" holds for most examples
        if isinstance(body, dict) and path in RESPONSE_MODELS and draw(st.integers(0, 3)) != 3:
            body = realistic(body, draw, chat="chat" in path)
        if isinstance(body, dict) and path not in RESPONSE_MODELS and draw(st.integers(0, 3)) != 3:
            body["lora_name"] = draw(st.sampled_from(["f1", "f2", *PRELOADED]))
            if "lora_path" in body:
                body["lora_path"] = draw(st.sampled_from(["lora-mlp", "prompt", "prefix", "missing", "../x"]))
        if isinstance(body, dict) and body and draw(st.integers(0, 9)) == 9:      # one field of garbage
            body[draw(st.sampled_from(sorted(body)))] = draw(ANY_JSON)
        return body
    return build()


def check(response: httpx.Response, spec: dict, path: str, method: str = "post") -> None:
    documented = spec["paths"][path][method]["responses"]
    status = response.status_code
    assert status < 500, (status, response.text)
    assert str(status) in documented, (status, response.text)
    content_type = response.headers["content-type"].split(";")[0]
    assert content_type in documented[str(status)]["content"], (status, content_type)
    if status != 200:
        error = ErrorResponse.model_validate_json(response.text)
        assert set(response.json()["error"]) == {"message", "type", "param", "code"} and error.error.message
        return
    if content_type == "text/event-stream":
        events = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]
        assert events[-1] == "[DONE]", events
        for event in events[:-1]:
            chunk = json.loads(event)
            if "error" in chunk:                  # after the first event: in band, never a server error
                assert ErrorResponse.model_validate(chunk).error.type != "server_error", chunk
            else:
                RESPONSE_MODELS[path][1].model_validate(chunk)
    elif path in RESPONSE_MODELS:
        RESPONSE_MODELS[path][0].model_validate_json(response.text)


def post(http: httpx.Client, path: str, body) -> httpx.Response:
    """The body as ASCII JSON, so lone surrogates travel as \\ud800 escapes (as any JSON client may send)."""
    return http.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})


@pytest.mark.parametrize("path, examples, min_ok", [
    ("/v1/completions", 150, 30), ("/v1/chat/completions", 100, 20),
    ("/v1/load_lora_adapter", 40, 2), ("/v1/unload_lora_adapter", 30, 2),      # a name loads / unloads once
])
def test_fuzz_post_endpoints(fuzz_server, path, examples, min_ok):
    served, spec, http = fuzz_server
    statuses: dict[int, int] = {}

    @fuzz_settings(examples)
    @given(body=bodies(spec, path))
    def run(body):
        response = post(http, path, body)
        check(response, spec, path)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

    run()
    assert statuses.get(200, 0) >= min_ok, statuses          # the fuzzing reached the engine
    assert_serving(http)


def test_get_endpoints_match_their_schema(fuzz_server):
    served, spec, http = fuzz_server
    for path, model in (("/v1/models", ModelList), ("/v1/adapters", AdapterList), ("/health", Health)):
        response = http.get(path)
        check(response, spec, path, "get")
        model.model_validate_json(response.text)
    metrics = http.get("/metrics")
    check(metrics, spec, "/metrics", "get")
    assert "peftserve_requests_total" in metrics.text
