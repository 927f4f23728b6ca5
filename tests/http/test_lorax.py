"""LoRAX's POST /generate and /generate_stream against LoRAX's documented shapes (transcribed below from its
Python client, predibase/lorax clients/python/lorax/types.py), with tokens equal to /v1/completions'; SGLang's
`model="base:adapter"` alias."""
from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import List, Optional

import pytest
from peft import LoraConfig
from pydantic import BaseModel, ConfigDict

from tests.http.conftest import MODEL_NAME, make_engine, serve_adapters
from tests.peft_fixtures import save_adapter

INPUTS = "The quick brown fox"


# ---- LoRAX's client types (the documented response shapes); extra fields are refused here -------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputToken(_Strict):
    id: int
    text: str
    logprob: Optional[float] = None


class AlternativeToken(_Strict):
    id: int
    text: str
    logprob: float


class Token(_Strict):
    id: int
    text: str
    logprob: float
    special: bool
    alternative_tokens: Optional[List[AlternativeToken]] = None
    skipped: bool


class FinishReason(str, Enum):
    Length = "length"
    EndOfSequenceToken = "eos_token"
    StopSequence = "stop_sequence"


class BestOfSequence(_Strict):
    generated_text: str
    finish_reason: FinishReason
    generated_tokens: int
    seed: Optional[int] = None
    prefill: List[InputToken]
    tokens: List[Token]


class Details(_Strict):
    finish_reason: FinishReason
    prompt_tokens: int
    generated_tokens: int
    skipped_tokens: int
    seed: Optional[int] = None
    prefill: List[InputToken]
    tokens: List[Token]
    best_of_sequences: Optional[List[BestOfSequence]] = None


class Response(_Strict):
    generated_text: str
    details: Optional[Details] = None


class StreamDetails(_Strict):
    finish_reason: FinishReason
    prompt_tokens: int
    generated_tokens: int
    seed: Optional[int] = None


class StreamResponse(_Strict):
    token: Token
    generated_text: Optional[str] = None
    details: Optional[StreamDetails] = None


# ---- fixtures ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lorax_server(demo_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("lorax-adapters")
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    dirs = {"qv": save_adapter(Path(demo_dir), config, root / "qv", seed=3)}
    thread, served = serve_adapters(make_engine(demo_dir), dirs)
    yield served
    thread.stop()


@pytest.fixture
def http(lorax_server):
    with lorax_server.client() as client:
        yield client


def generate(http, **parameters) -> Response:
    answer = http.post("/generate", json={"inputs": INPUTS, "parameters": parameters})
    assert answer.status_code == 200, answer.text
    return Response.model_validate(answer.json())


def stream(http, **parameters) -> list[StreamResponse]:
    answer = http.post("/generate_stream", json={"inputs": INPUTS, "parameters": parameters})
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/event-stream")
    events = [line for line in answer.text.split("\n\n") if line]
    assert all(e.startswith("data:") for e in events) and "[DONE]" not in answer.text
    return [StreamResponse.model_validate(json.loads(e.removeprefix("data:"))) for e in events]


def completion_ids(http, model: str, max_tokens: int, **kw) -> tuple[list[int], str, int]:
    body = {"model": model, "prompt": INPUTS, "max_tokens": max_tokens, "temperature": 0, "logprobs": 0,
            "return_tokens_as_token_ids": True, **kw}
    answer = http.post("/v1/completions", json=body).json()
    choice = answer["choices"][0]
    return ([int(t.removeprefix("token_id:")) for t in choice["logprobs"]["tokens"]], choice["text"],
            answer["usage"]["prompt_tokens"])


# ---- tests ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("adapter", [None, "qv"])
def test_generate_equals_completions(http, adapter):
    params = {"max_new_tokens": 10, "details": True, "ignore_eos_token": True}
    if adapter:
        params["adapter_id"] = adapter
        params["adapter_source"] = "local"
    response = generate(http, **params)
    ids, text, num_prompt = completion_ids(http, adapter or MODEL_NAME, 10, ignore_eos=True)
    details = response.details
    assert [t.id for t in details.tokens] == ids and response.generated_text == text
    assert "".join(t.text for t in details.tokens) == text
    assert details.finish_reason == FinishReason.Length and details.generated_tokens == 10
    assert details.prompt_tokens == num_prompt and details.seed is None and details.prefill == []
    assert all(t.logprob <= 0 for t in details.tokens)
    if adapter:
        assert ids != completion_ids(http, MODEL_NAME, 10, ignore_eos=True)[0]      # the adapter matters
    assert generate(http, **{**params, "details": False}) == Response(generated_text=text)


def test_generate_stream_events(http):
    whole = generate(http, max_new_tokens=8, details=True, adapter_id="qv", ignore_eos_token=True)
    events = stream(http, max_new_tokens=8, details=True, adapter_id="qv", ignore_eos_token=True)
    assert [e.token.id for e in events] == [t.id for t in whole.details.tokens]
    assert "".join(e.token.text for e in events) == whole.generated_text
    assert all(e.generated_text is None and e.details is None for e in events[:-1])
    last = events[-1]
    assert last.generated_text == whole.generated_text
    assert last.details == StreamDetails(finish_reason="length", prompt_tokens=whole.details.prompt_tokens,
                                         generated_tokens=8, seed=None)
    assert stream(http, max_new_tokens=3)[-1].details is None          # details only when asked for


def test_sampling_seed_best_of_alternatives_prefill_and_full_text(http):
    sampled = generate(http, max_new_tokens=6, do_sample=True, seed=42, details=True)
    assert sampled.details.seed == 42 and generate(http, max_new_tokens=6, do_sample=True, seed=42,
                                                   details=True) == sampled
    best = generate(http, max_new_tokens=6, do_sample=True, best_of=3, details=True)
    assert len(best.details.best_of_sequences) == 2
    seeds = {best.details.seed, *(s.seed for s in best.details.best_of_sequences)}
    assert len(seeds) == 3 and None not in seeds
    alternatives = generate(http, max_new_tokens=3, return_k_alternatives=2, details=True)
    for token in alternatives.details.tokens:
        assert len(token.alternative_tokens) == 2 and token.alternative_tokens[0].id == token.id
    prefill = generate(http, max_new_tokens=2, decoder_input_details=True, details=True).details.prefill
    prompt_ids = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": INPUTS, "max_tokens": 1,
                                                    "echo": True}).json()
    assert len(prefill) == prompt_ids["usage"]["prompt_tokens"]
    full = generate(http, max_new_tokens=4, return_full_text=True)
    assert full.generated_text == INPUTS + generate(http, max_new_tokens=4).generated_text


def test_stop_sequence_and_repetition_penalty(http):
    text = generate(http, max_new_tokens=10, ignore_eos_token=True).generated_text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    stopped = generate(http, max_new_tokens=10, stop=[stop], details=True, ignore_eos_token=True)
    assert stopped.details.finish_reason == FinishReason.StopSequence
    assert stopped.generated_text == text[:text.index(stop)]
    penalised = generate(http, max_new_tokens=10, repetition_penalty=1.8, details=True, ignore_eos_token=True)
    ids, _, _ = completion_ids(http, MODEL_NAME, 10, ignore_eos=True, repetition_penalty=1.8)
    assert [t.id for t in penalised.details.tokens] == ids


def test_base_colon_adapter_alias(http):
    assert completion_ids(http, f"{MODEL_NAME}:qv", 8)[0] == completion_ids(http, "qv", 8)[0]
    answer = http.post("/v1/completions", json={"model": f"{MODEL_NAME}:nope", "prompt": "x"})
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("parameters, status", [
    ({"adapter_id": "qv", "adapter_source": "hub"}, 400),
    ({"adapter_id": "qv", "adapter_source": "s3"}, 400),
    ({"adapter_id": "no-such-adapter"}, 404),
    ({"temperature": 0}, 400), ({"top_p": 1.0}, 400), ({"max_new_tokens": 0}, 400),
    ({"best_of": 2}, 400), ({"best_of": 2, "do_sample": True, "seed": 1}, 400),
    ({"typical_p": 0.5}, 400), ({"watermark": True}, 400),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400),
    ({"max_new_tokens": "many"}, 422),
])
def test_bad_parameters_are_lorax_errors(http, parameters, status):
    answer = http.post("/generate", json={"inputs": INPUTS, "parameters": parameters})
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert set(body) == {"error", "error_type"} and isinstance(body["error"], str) and body["error"]
    assert body["error_type"] == "validation"
    assert generate(http, max_new_tokens=1).generated_text is not None           # still serving


def test_stream_rejects_best_of_and_decoder_input_details(http):
    for parameters in ({"best_of": 2, "do_sample": True}, {"decoder_input_details": True}):
        answer = http.post("/generate_stream", json={"inputs": INPUTS, "parameters": parameters})
        assert answer.status_code == 400 and answer.json()["error_type"] == "validation"
