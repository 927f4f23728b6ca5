"""Every error leaves in OpenAI's shape with the right status, and the server keeps serving afterwards."""
import json
import threading
import time

import httpx
import openai
import pytest

from tests.http.conftest import MODEL_NAME, assert_serving, metric_value

AUTH = {"Authorization": "Bearer sekret"}


def assert_error(response: httpx.Response, status: int, param=None, code=None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param and error["code"] == code
    return error


def completion(**fields) -> dict:
    return {"model": MODEL_NAME, "prompt": "hello", "max_tokens": 2, **fields}


def test_malformed_json_is_400(client):
    response = client.post("/v1/completions", content=b'{"model": "demo", "prompt": ',
                           headers={"content-type": "application/json"})
    assert "not valid JSON" in assert_error(response, 400)["message"]
    assert_serving(client)


@pytest.mark.parametrize("body, param", [
    ({"model": MODEL_NAME}, "prompt"),                                   # missing field
    (completion(temperature="hot"), "temperature"),                      # wrong type
    (completion(prompt=[1, "a"]), "prompt"),
    ({"model": MODEL_NAME, "messages": [{"content": "no role"}]}, "messages.0.role"),
])
def test_schema_error_is_422(client, body, param):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    error = assert_error(client.post(path, json=body), 422, param=param)
    assert error["type"] == "invalid_request_error"
    assert_serving(client)


def test_unknown_model_is_404(client, openai_client):
    assert_error(client.post("/v1/completions", json=completion(model="nope")), 404, "model", "model_not_found")
    with pytest.raises(openai.NotFoundError) as caught:
        openai_client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert caught.value.code == "model_not_found"
    assert_serving(client)


@pytest.mark.parametrize("fields, param", [
    ({"temperature": 5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"n": 129}, "n"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"logprobs": 50}, "logprobs"),
    ({"prompt": ["a"] * 129}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": [10 ** 6]}, "prompt"),                                   # token id outside the vocabulary
    ({"echo": True, "logprobs": 1}, "echo"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),     # only with stream=true
])
def test_bad_parameter_is_400_with_param(client, fields, param):
    assert_error(client.post("/v1/completions", json=completion(**fields)), 400, param)
    assert_serving(client)


def test_bad_parameter_via_openai_client(openai_client, client):
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client.completions.create(model=MODEL_NAME, prompt="x", temperature=5)
    assert caught.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "x"}],
                                              logprobs=True, top_logprobs=21)
    assert caught.value.param == "top_logprobs"
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "x"}],
                                              top_logprobs=2)
    assert caught.value.param == "top_logprobs"
    assert_serving(client)


@pytest.mark.parametrize("stream", [False, True])
def test_prompt_too_long_is_400(client, server, stream):
    too_long = [5] * (server.engine.max_model_len + 1)
    assert_error(client.post("/v1/completions", json=completion(prompt=too_long, stream=stream)), 400, "prompt")
    fits_but_no_room = [5] * (server.engine.max_model_len - 1)
    assert_error(client.post("/v1/completions", json=completion(prompt=fits_but_no_room, max_tokens=10)),
                 400, "max_tokens")
    long_chat = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "x " * 2000}], "stream": stream}
    assert_error(client.post("/v1/chat/completions", json=long_chat), 400, "messages")
    assert_serving(client)


def test_unknown_route_is_404_in_openai_shape(client):
    assert_error(client.get("/v1/nothing"), 404)


# ---- the gated server: api key, max_waiting=2, a step that can be held or made to fail -----------------------
def test_api_key_required_on_inference_routes(gated_server):
    with gated_server.client() as http:
        for path in ("/v1/models", "/v1/completions"):
            missing = http.post(path, json=completion()) if "compl" in path else http.get(path)
            assert_error(missing, 401, code="invalid_api_key")
        wrong = http.post("/v1/completions", json=completion(), headers={"Authorization": "Bearer wrong"})
        assert_error(wrong, 401, code="invalid_api_key")
        assert http.get("/health").status_code == 200
        assert http.get("/v1/models", headers=AUTH).status_code == 200
        assert_serving(http, headers=AUTH)
    with openai.OpenAI(base_url=gated_server.url + "/v1", api_key="sekret", max_retries=0) as oai:
        assert oai.completions.create(model=MODEL_NAME, prompt="x", max_tokens=1).usage.completion_tokens == 1


def test_overload_is_503_then_recovers(gated_server):
    engine = gated_server.engine
    results: list[httpx.Response] = []
    threads: list[threading.Thread] = []

    def post_in_background():
        def post():
            with gated_server.client() as http:
                results.append(http.post("/v1/completions", json=completion(max_tokens=3), headers=AUTH))
        threads.append(threading.Thread(target=post))
        threads[-1].start()

    engine.gate.clear()
    try:
        with gated_server.client() as http:
            def num_waiting():
                return metric_value(http.get("/metrics").text, "peftserve_num_requests_waiting")

            post_in_background()
            assert engine.in_step.wait(10)          # the engine thread is stuck in a step
            while num_waiting() < 2:                # fill the queue up to max_waiting=2
                before = num_waiting()
                post_in_background()
                deadline = time.monotonic() + 10
                while num_waiting() == before:
                    assert time.monotonic() < deadline, "request never queued"
                    time.sleep(0.01)
            assert_error(http.post("/v1/completions", json=completion(), headers=AUTH), 503, code="overloaded")
            assert_error(http.post("/v1/chat/completions", headers=AUTH, json={
                "model": MODEL_NAME, "messages": [{"role": "user", "content": "x"}], "stream": True}),
                503, code="overloaded")
            assert http.get("/health").status_code == 200
    finally:
        engine.gate.set()
    for thread in threads:
        thread.join(30)
    assert [r.status_code for r in results] == [200] * len(threads)
    with gated_server.client() as http:
        assert_serving(http, headers=AUTH)


@pytest.mark.parametrize("stream", [False, True])
def test_step_failure_is_500_and_server_survives(gated_server, stream):
    gated_server.engine.fail_in_steps = 1
    with gated_server.client() as http:
        failures_before = count_500(http)
        response = http.post("/v1/completions", json=completion(stream=stream), headers=AUTH)
        if stream:       # it failed before the first output, so it still gets a status code
            assert_error(response, 500, code="internal_error")
        else:
            assert "injected step failure" in assert_error(response, 500, code="internal_error")["message"]
        assert gated_server.async_engine.is_running
        assert_serving(http, headers=AUTH)
        assert count_500(http) == failures_before + 1


def count_500(http: httpx.Client) -> float:
    labels = 'endpoint="/v1/completions",status="500"'
    return metric_value(http.get("/metrics").text, "peftserve_requests_total", labels) or 0


def test_step_failure_mid_stream_is_reported_in_band(gated_server):
    gated_server.engine.fail_in_steps = 4           # prefill + 2 decodes succeed
    with gated_server.client() as http:
        body = completion(max_tokens=50, stream=True, ignore_eos=True)
        with http.stream("POST", "/v1/completions", json=body, headers=AUTH) as response:
            assert response.status_code == 200
            events = [line for line in response.iter_lines() if line.startswith("data: ")]
        assert all('"text_completion"' in event for event in events[:-2])
        error = json.loads(events[-2].removeprefix("data: "))["error"]
        assert error["code"] == "internal_error" and "injected" in error["message"]
        assert events[-1] == "data: [DONE]"
        assert_serving(http, headers=AUTH)
