"""/v1/models, /health, /metrics, and client disconnects freeing KV blocks."""
import threading
import time

import httpx
import pytest

from tests.http.conftest import MODEL_NAME, assert_serving, metric_value

AUTH = {"Authorization": "Bearer sekret"}
LONG = {"model": MODEL_NAME, "prompt": "class Queue:", "max_tokens": 400, "temperature": 0, "ignore_eos": True}


def gauge(http: httpx.Client, name: str) -> float:
    return metric_value(http.get("/metrics").text, name)


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_models(openai_client, server):
    models = openai_client.models.list().data
    assert [(m.id, m.object, m.owned_by) for m in models] == [(MODEL_NAME, "model", "peftserve")]
    assert models[0].model_extra["max_model_len"] == server.engine.max_model_len


def test_health(client):
    response = client.get("/health")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_metrics_count_requests_and_tokens(client):
    before = client.get("/metrics").text
    assert_serving(client)
    client.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    text = client.get("/metrics").text
    assert text.startswith("# HELP")

    def grew(name, labels="", by=1.0):
        return (metric_value(text, name, labels) or 0) - (metric_value(before, name, labels) or 0) >= by

    assert grew("peftserve_requests_total", 'endpoint="/v1/completions",status="200"')
    assert grew("peftserve_requests_total", 'endpoint="/v1/completions",status="404"')
    assert grew("peftserve_prompt_tokens_total", 'adapter=""', by=2)
    assert grew("peftserve_generation_tokens_total", 'adapter=""', by=2)
    assert grew("peftserve_adapter_requests_total", 'adapter=""')
    assert grew("peftserve_time_to_first_token_seconds_count")
    assert grew("peftserve_e2e_request_latency_seconds_count")
    assert metric_value(text, "peftserve_kv_blocks_total") > 0
    assert metric_value(text, "peftserve_kv_blocks_used") == 0
    for name in ("peftserve_num_requests_running", "peftserve_num_requests_waiting", "peftserve_kv_cache_usage_ratio"):
        assert metric_value(text, name) == 0, name


@pytest.fixture
def slow_server(gated_server):
    """The gated server with 10 ms steps, so a 400-token request takes 4 s: time enough to walk away."""
    gated_server.engine.step_delay = 0.01
    yield gated_server
    gated_server.engine.step_delay = 0.0


def test_stream_disconnect_frees_kv_blocks(slow_server):
    with slow_server.client(headers=AUTH) as client:
        finished_before = gauge(client, "peftserve_e2e_request_latency_seconds_count")
        with slow_server.client(headers=AUTH) as streaming:
            with streaming.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as response:
                lines = response.iter_lines()
                for _ in range(2):
                    assert next(line for line in lines if line.startswith("data: {"))
                assert gauge(client, "peftserve_kv_blocks_used") > 0
                assert gauge(client, "peftserve_num_requests_running") == 1
        # the client closed the connection long before 400 tokens
        wait_for(lambda: gauge(client, "peftserve_kv_blocks_used") == 0, timeout=2)
        assert gauge(client, "peftserve_num_requests_running") == 0
        assert gauge(client, "peftserve_e2e_request_latency_seconds_count") == finished_before  # aborted, not done
        assert_serving(client)


def test_non_stream_disconnect_frees_kv_blocks(slow_server):
    outcome = {}

    def impatient_client():
        with slow_server.client(headers=AUTH, timeout=httpx.Timeout(30, read=0.5)) as http:
            try:
                http.post("/v1/completions", json=LONG)
            except httpx.ReadTimeout:       # httpx closes the connection
                outcome["timed_out"] = True

    with slow_server.client(headers=AUTH) as client:
        finished_before = gauge(client, "peftserve_e2e_request_latency_seconds_count")
        thread = threading.Thread(target=impatient_client)
        thread.start()
        wait_for(lambda: gauge(client, "peftserve_kv_blocks_used") > 0)
        thread.join(10)
        assert outcome == {"timed_out": True}
        wait_for(lambda: gauge(client, "peftserve_kv_blocks_used") == 0, timeout=2)
        assert gauge(client, "peftserve_num_requests_running") == 0
        assert gauge(client, "peftserve_e2e_request_latency_seconds_count") == finished_before
        assert_serving(client)
