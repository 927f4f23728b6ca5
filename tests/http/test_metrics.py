"""/metrics after traffic on two adapters and the base: per-adapter counters, histogram counts, tier gauges,
adapter loads, and vLLM's router gauges (`vllm:lora_requests_info` labels as vLLM formats them) mid-flight and
back at idle. One device slot (--max-loras 1), so while `alpha` runs, `beta` must wait: both lists are seen."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from peft import LoraConfig
from prometheus_client.parser import text_string_to_metric_families

from tests.http.conftest import MODEL_NAME, GatedEngine, make_engine, serve
from tests.peft_fixtures import save_adapter

LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
TOKENS = {"alpha": 60, "beta": 7, None: 5}          # max_tokens per request (ignore_eos: exactly this many)


def scrape(http) -> dict[str, list[tuple[dict, float]]]:
    """sample name -> [(labels, value)] from /metrics."""
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def value(samples, name: str, **labels) -> float:
    matches = [v for found, v in samples.get(name, []) if all(found.get(k) == v for k, v in labels.items())]
    assert len(matches) == 1, (name, labels, samples.get(name))
    return matches[0]


def lora_info(samples) -> dict:
    [(labels, stamp)] = samples["vllm:lora_requests_info"]
    return {**labels, "age": time.time() - stamp}


def wait_for(http, condition, what: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        samples = scrape(http)
        if condition(samples):
            return samples
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}: {samples.get('vllm:lora_requests_info')}")


@pytest.fixture(scope="module")
def metered(demo_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics-adapters")
    for i, name in enumerate(("alpha", "beta")):
        save_adapter(Path(demo_dir), LORA, root / name, seed=90 + i)
    (root / "broken").mkdir()
    (root / "broken" / "adapter_config.json").write_text("{not json")
    engine = GatedEngine(make_engine(demo_dir, max_loras=1, max_num_seqs=8))
    thread, served = serve(engine, adapter_dirs=[str(root)])
    served.engine.step_delay = 0.03          # alpha's 60 tokens take ~2 s: time to see beta waiting meanwhile
    yield served
    thread.stop()


def complete(http, model: str | None) -> dict:
    body = {"model": model or MODEL_NAME, "prompt": f"metrics {model}", "max_tokens": TOKENS[model],
            "temperature": 0, "ignore_eos": True}
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()["usage"]


def test_metrics_after_traffic_on_two_adapters_and_the_base(metered):
    with metered.client() as http, ThreadPoolExecutor(3) as pool:
        idle = scrape(http)
        assert value(idle, "vllm:num_requests_running", model_name=MODEL_NAME) == 0
        assert lora_info(idle)["running_lora_adapters"] == "" and lora_info(idle)["max_lora"] == "1"

        # loads through the admin route: two good, one bad
        for name in ("alpha", "beta", "broken"):
            http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": name})
        loaded = scrape(http)
        assert value(loaded, "peftserve_adapter_loads_total", result="ok") == 2
        assert value(loaded, "peftserve_adapter_loads_total", result="error") == 1
        assert value(loaded, "peftserve_adapter_load_seconds_count") == 2
        assert value(loaded, "peftserve_adapters", tier="device") + value(loaded, "peftserve_adapters",
                                                                          tier="host") == 2
        installs = value(loaded, "peftserve_adapter_installs_total")
        evictions = value(loaded, "peftserve_adapter_evictions_total", to="host")

        alpha = pool.submit(complete, http, "alpha")
        wait_for(http, lambda s: lora_info(s)["running_lora_adapters"] == "alpha", "alpha running")
        beta, base = pool.submit(complete, http, "beta"), pool.submit(complete, http, None)
        busy = wait_for(http, lambda s: lora_info(s)["waiting_lora_adapters"] == "beta"
                        and value(s, "vllm:num_requests_running", model_name=MODEL_NAME) == 2,
                        "beta waiting beside alpha and the base running")
        info = lora_info(busy)
        assert (info["running_lora_adapters"], info["waiting_lora_adapters"], info["max_lora"]) == \
            ("alpha", "beta", "1")
        assert 0 <= info["age"] < 60                            # the value is the current Unix time
        assert value(busy, "vllm:num_requests_waiting", model_name=MODEL_NAME) == 1
        assert value(busy, "peftserve_num_requests_running") == 2
        assert 0 < value(busy, "vllm:kv_cache_usage_perc", model_name=MODEL_NAME) < 1
        usage = {"alpha": alpha.result(60), "beta": beta.result(60), None: base.result(60)}

        done = wait_for(http, lambda s: value(s, "vllm:num_requests_running", model_name=MODEL_NAME) == 0,
                        "idle")
    for model, label in (("alpha", "alpha"), ("beta", "beta"), (None, "")):
        assert value(done, "peftserve_adapter_requests_total", adapter=label) == 1
        assert value(done, "peftserve_generation_tokens_total", adapter=label) == TOKENS[model]
        assert value(done, "peftserve_prompt_tokens_total", adapter=label) == usage[model]["prompt_tokens"]
    for histogram in ("peftserve_time_to_first_token_seconds", "peftserve_e2e_request_latency_seconds",
                      "peftserve_request_queue_time_seconds", "peftserve_time_per_output_token_seconds"):
        assert value(done, histogram + "_count") == 3, histogram
    # beta waited for alpha's slot: its queue time is at least alpha's remaining run, so above 0.1 s
    assert value(done, "peftserve_request_queue_time_seconds_bucket", le="0.1") <= 2
    # back to idle
    info = lora_info(done)
    assert (info["running_lora_adapters"], info["waiting_lora_adapters"]) == ("", "")
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert value(done, name, model_name=MODEL_NAME) == 0, name
    assert value(done, "peftserve_kv_blocks_used") == 0
    # beta took alpha's only slot: one eviction to the host tier, one install
    assert value(done, "peftserve_adapter_evictions_total", to="host") == evictions + 1
    assert value(done, "peftserve_adapter_installs_total") == installs + 1
    assert (value(done, "peftserve_adapters", tier="device"), value(done, "peftserve_adapters", tier="host"),
            value(done, "peftserve_adapters", tier="disk")) == (1, 1, 0)
    with metered.client() as http:
        described = {a["name"]: a for a in http.get("/v1/adapters").json()["data"]}
    assert described["beta"]["tier"] == "device"
    assert value(done, "peftserve_adapter_bytes", tier="device") == described["beta"]["num_bytes"] > 0
    assert value(done, "peftserve_adapter_bytes", tier="host") == described["alpha"]["num_bytes"]


def test_vllm_lora_info_lists_running_adapters_comma_joined():
    """Two adapters running at once: comma-joined, no spaces, first seen first (as vLLM's ",".join)."""
    from server.engine_metrics import EngineCollector
    stats = {"max_loras": 4, "running_adapters": ["shout", "json"], "waiting_adapters": ["pirate", "a b"]}
    [family] = [f for f in EngineCollector(lambda: stats, "m").collect() if f.name == "vllm:lora_requests_info"]
    [sample] = family.samples
    assert sample.labels == {"max_lora": "4", "running_lora_adapters": "shout,json",
                             "waiting_lora_adapters": "pirate,a b"}
    assert abs(sample.value - time.time()) < 60
