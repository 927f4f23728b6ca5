"""Adapter lifecycle through HTTP: vLLM's load / unload endpoints, GET /v1/adapters, just-in-time loading from
--adapter-dir, a device budget smaller than the adapters, busy unloads, bad checkpoints, path confinement, the
admin key. Truth: each request's text alone (or on an engine with every adapter resident)."""
from __future__ import annotations

import json
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from server.cli import main
from tests.http.conftest import KV_CACHE, MODEL_NAME, GatedEngine, ServerThread, assert_serving, make_engine, serve
from tests.peft_fixtures import save_adapter

LORA = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
NAMES = ["a0", "a1", "a2", "a3", "a4"]
PROMPTS = {"a0": "def f(x):", "a1": "import sys\n", "a2": "class A:", "a3": "for k in d:", "a4": "while 1:",
           None: "return [i"}
WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def root(demo_dir, tmp_path_factory) -> Path:
    """An --adapter-dir with five good adapters, and a sibling directory outside it."""
    base = tmp_path_factory.mktemp("lifecycle")
    root = base / "adapters"
    for i, name in enumerate(NAMES):
        save_adapter(Path(demo_dir), LORA, root / name, seed=40 + i)
    shutil.copytree(root / "a0", base / "outside")
    return root


@pytest.fixture(scope="module")
def size(demo_dir, root) -> int:
    return make_engine(demo_dir).adapters.read(str(root / "a0")).num_bytes


@pytest.fixture(scope="module")
def expected(demo_dir, root) -> dict:
    """Greedy text of PROMPTS[name] (8 tokens) on an engine with every adapter resident."""
    engine = make_engine(demo_dir)
    for name in NAMES:
        engine.adapters.load(name, str(root / name))
    out = {}
    for name, prompt in PROMPTS.items():
        ids = engine.generate([engine.tokenizer.encode(prompt)], _params(8), [name])[0]
        out[name] = engine.tokenizer.decode(ids, skip_special_tokens=True)
    return out


def _params(max_tokens):
    from server.sampling import SamplingParams
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def served(demo_dir, root, size):
    """Device budget of 2.5 adapters, host tier of 1; a0 preloaded; the engine can be slowed down."""
    engine = make_engine(demo_dir, max_adapter_memory=int(2.5 * size), max_host_adapter_memory=size)
    engine.adapters.load("a0", str(root / "a0"))
    thread, served = serve(GatedEngine(engine), adapter_dirs=[str(root)])
    yield served
    served.engine.gate.set()
    thread.stop()


@pytest.fixture
def http(served):
    with served.client() as client:
        yield client


def complete(http, model, prompt=None, max_tokens=8, **extra):
    body = {"model": model or MODEL_NAME, "prompt": prompt or PROMPTS.get(model, "x = "), "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, **extra}
    return http.post("/v1/completions", json=body)


def text(response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def adapters(http) -> dict[str, dict]:
    response = http.get("/v1/adapters")
    assert response.status_code == 200, response.text
    return {a["name"]: a for a in response.json()["data"]}


def load(http, name, path, **extra):
    return http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path), **extra})


def unload(http, name):
    return http.post("/v1/unload_lora_adapter", json={"lora_name": name})


def test_load_and_unload_speak_vllm(http, root, expected):
    ok = load(http, "x", "a1")                                  # relative: inside the --adapter-dir
    assert (ok.status_code, ok.text) == (200, "Success: LoRA adapter 'x' added successfully.")
    assert text(complete(http, "x", PROMPTS["a1"])) == expected["a1"]
    again = load(http, "x", root / "a2")
    assert again.status_code == 400 and "has already been loaded" in again.json()["error"]["message"]
    assert load(http, "x", root / "a2", load_inplace=True).status_code == 200
    assert text(complete(http, "x", PROMPTS["a2"])) == expected["a2"]
    models = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    assert models["x"]["parent"] == MODEL_NAME and models["x"]["root"] == str(root / "a2")
    gone = unload(http, "x")
    assert (gone.status_code, gone.text) == (200, "Success: LoRA adapter 'x' removed successfully.")
    missing = unload(http, "x")
    assert missing.status_code == 404 and missing.json()["error"]["message"] == \
        "The lora adapter 'x' cannot be found."
    assert complete(http, "x", "x").status_code == 404
    nowhere = load(http, "y", root / "no-such-adapter")
    assert nowhere.status_code == 404 and "No adapter found" in nowhere.json()["error"]["message"]
    assert load(http, "", "a1").status_code == 400
    assert load(http, "a\x00b", "a1").status_code == 400                  # #11: NUL in a name
    assert http.post("/v1/load_lora_adapter", json={"lora_name": "y"}).status_code == 422   # lora_path missing


def test_adapters_endpoint(http, root, size):
    assert load(http, "pinned", root / "a4", pinned=True).status_code == 200
    listed = adapters(http)["pinned"]
    assert listed == {"name": "pinned", "kind": "lora", "path": str(root / "a4"), "tier": "device",
                      "pinned": True, "rank": 8, "num_bytes": size, "slot": listed["slot"], "adapter_drop": 0,
                      "active_requests": 0, "requests_served": 0}
    text(complete(http, "pinned", PROMPTS["a4"]))
    assert adapters(http)["pinned"]["requests_served"] == 1
    usage = http.get("/v1/adapters").json()["usage"]
    assert usage["max_device_bytes"] == int(2.5 * size) and usage["device_bytes"] <= usage["max_device_bytes"]
    assert unload(http, "pinned").status_code == 200


def test_just_in_time_loading_and_a_budget_smaller_than_the_adapters(http, served, expected, size):
    """a1..a4 are not loaded: the first request for each loads it from the --adapter-dir. With a0 that is five
    adapters on a device that holds two, requested concurrently, several times each."""
    assert not {"a1", "a2", "a3", "a4"} & set(adapters(http))
    names = [None, *NAMES] * 3

    def ask(name):
        with served.client() as client:
            return text(complete(client, name))

    with ThreadPoolExecutor(6) as pool:
        texts = list(pool.map(ask, names))
    assert texts == [expected[name] for name in names]
    listed = adapters(http)
    assert set(NAMES) <= set(listed) and all(listed[n]["requests_served"] >= 3 for n in NAMES)
    tiers = [listed[n]["tier"] for n in NAMES]
    assert tiers.count("device") <= 2 and set(tiers) - {"device"}          # the rest were evicted
    assert http.get("/v1/adapters").json()["usage"]["device_bytes"] <= 2.5 * size
    assert complete(http, "not-an-adapter").status_code == 404


def test_load_and_unload_during_generation_leave_other_requests_identical(http, served, root, expected):
    """Requests for a0, a1 and the base run while other adapters are loaded, replaced and unloaded."""
    served.engine.step_delay = 0.002
    stop = threading.Event()
    results: list[tuple[str, str]] = []

    def traffic(name):
        with served.client() as client:
            while not stop.is_set():
                results.append((name, text(complete(client, name))))

    workers = [threading.Thread(target=traffic, args=(name,)) for name in ("a0", "a1", None)]
    for worker in workers:
        worker.start()
    try:
        for round_ in range(3):
            assert load(http, "churn", root / "a2").status_code == 200
            assert load(http, "churn", root / "a3", load_inplace=True).status_code == 200
            assert text(complete(http, "churn", PROMPTS["a3"])) == expected["a3"]
            assert unload(http, "churn").status_code == 200
    finally:
        stop.set()
        for worker in workers:
            worker.join(60)
        served.engine.step_delay = 0.0
    assert {name for name, _ in results} == {"a0", "a1", None}
    assert all(got == expected[name] for name, got in results), results


def test_unload_of_a_busy_adapter_drains(http, served, root, expected):
    assert load(http, "busy", root / "a2").status_code == 200
    solo = text(complete(http, "busy", PROMPTS["a2"], max_tokens=24))
    served.engine.step_delay = 0.02
    try:
        with served.client() as client:
            body = {"model": "busy", "prompt": PROMPTS["a2"], "max_tokens": 24, "temperature": 0,
                    "ignore_eos": True, "stream": True}
            with client.stream("POST", "/v1/completions", json=body) as stream:
                lines = stream.iter_lines()
                chunks = [next(line for line in lines if line.startswith("data: "))]
                assert unload(http, "busy").status_code == 200        # returns at once: the name is gone
                assert complete(http, "busy").status_code == 404
                chunks += [line for line in lines if line.startswith("data: ")]
    finally:
        served.engine.step_delay = 0.0
    assert chunks[-1] == "data: [DONE]"
    assert "".join(json.loads(c[6:])["choices"][0]["text"] for c in chunks[:-1]) == solo
    assert "busy" not in adapters(http) and http.get("/v1/adapters").json()["usage"]["num_draining"] == 0


# ---- bad checkpoints: each a 400 naming the problem, the server exactly as it was ---------------------------
def _edit_tensors(path: Path, edit) -> None:
    tensors = load_file(str(path / WEIGHTS))
    edit(tensors)
    save_file(tensors, str(path / WEIGHTS))


def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
BAD = {
    "shape": (lambda p: _edit_tensors(p, lambda t: t.update({Q_A: torch.randn(8, 48)})),
              "shape mismatch: lora_A (8, 48) has 48 input features, the base module has 64"),
    "dtype": (lambda p: _edit_tensors(p, lambda t: t.update({Q_A: torch.ones(8, 64, dtype=torch.int32)})),
              "has dtype torch.int32"),
    "rank": (lambda p: _edit_config(p, r=4), "rank mismatch: the tensors have r=8 but adapter_config.json gives r=4"),
    "target": (lambda p: _edit_config(p, target_modules=["k_proj"]), "does not target this module"),
    "base-model": (lambda p: _edit_tensors(p, lambda t: t.update(
        {k.replace("layers.1.", "layers.7."): t.pop(k) for k in list(t) if "layers.1." in k})),
        "names layer 7 (model.layers.7.mlp.down_proj) but the base model has 2 layers"),
    "nan": (lambda p: _edit_tensors(p, lambda t: t[Q_A].view(-1).__setitem__(3, float("nan"))),
            "NaN/inf value"),
    "truncated": (lambda p: (p / WEIGHTS).write_bytes((p / WEIGHTS).read_bytes()[:-64]),
                  "truncated or corrupt safetensors file"),
    "bad-header": (lambda p: (p / WEIGHTS).write_bytes(b"\xff" * 8 + b"{}"), "truncated or corrupt safetensors"),
    "pickle": (lambda p: (p / WEIGHTS).rename(p / "adapter_model.bin"), "a pickle) found; we load"),
    "kind": (lambda p: _edit_config(p, peft_type="LOHA"), "unsupported peft_type 'LOHA'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_checkpoint_is_a_400_and_changes_nothing(http, root, case):
    corrupt, message = BAD[case]
    path = root / f"bad-{case}"
    shutil.copytree(root / "a1", path)
    corrupt(path)
    before = adapters(http)
    response = load(http, "bad", path)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"]
    just_in_time = complete(http, f"bad-{case}")                       # the same adapter, by name
    assert just_in_time.status_code == 400 and message in just_in_time.json()["error"]["message"]
    assert adapters(http) == before
    assert_serving(http)


# ---- where adapters may come from ------------------------------------------------------------------------
def test_path_traversal_and_symlink_escape_are_refused(http, root):
    outside = root.parent / "outside"
    link = root / "escape"
    if not link.exists():
        link.symlink_to(outside, target_is_directory=True)
    sneaky = root / "sneaky"
    if not sneaky.exists():
        sneaky.mkdir()
        shutil.copy(outside / "adapter_config.json", sneaky / "adapter_config.json")
        (sneaky / WEIGHTS).symlink_to(outside / WEIGHTS)
    before = adapters(http)
    cases = {
        "../outside": "path traversal is not allowed",
        str(root / ".." / "outside"): "path traversal is not allowed",
        "a0/../../outside": "path traversal is not allowed",
        str(outside): "outside the allowed adapter directories",
        "/etc": "outside the allowed adapter directories",
        "escape": "symlink leading outside",
        str(link): "symlink leading outside",
        "sneaky": f"{WEIGHTS} is a symlink leading outside",
    }
    for path, message in cases.items():
        response = load(http, "evil", path)
        assert response.status_code == 400 and message in response.json()["error"]["message"], (path, response.text)
    for name in ("escape", "sneaky"):                                  # just in time, by model name
        response = complete(http, name, "x")
        assert response.status_code == 400 and "symlink" in response.json()["error"]["message"]
    response = complete(http, "../outside", "x")
    assert response.status_code == 400 and "traversal" in response.json()["error"]["message"]
    assert adapters(http) == before and os.path.isdir(outside)


def test_admin_key_guards_admin_routes_only(demo_dir, root):
    thread, served = serve(make_engine(demo_dir), api_key="user-key", admin_api_key="admin-key",
                           adapter_dirs=[str(root)])
    user, admin = ({"Authorization": f"Bearer {k}"} for k in ("user-key", "admin-key"))
    try:
        with served.client() as http:
            body = {"lora_name": "k", "lora_path": "a0"}
            for headers in ({}, user):
                for response in (http.post("/v1/load_lora_adapter", json=body, headers=headers),
                                 http.post("/v1/unload_lora_adapter", json=body, headers=headers),
                                 http.get("/v1/adapters", headers=headers)):
                    assert response.status_code == 401 and "admin API key" in response.json()["error"]["message"]
            assert http.post("/v1/load_lora_adapter", json=body, headers=admin).status_code == 200
            assert "k" in {a["name"] for a in http.get("/v1/adapters", headers=admin).json()["data"]}
            assert complete(http, "k", "x").status_code == 401
            assert http.post("/v1/completions", headers=admin, json={"model": "k", "prompt": "x",
                                                                     "max_tokens": 2}).status_code == 401
            assert_serving(http, headers=user)
            assert http.post("/v1/completions", headers=user, json={"model": "k", "prompt": "x",
                                                                    "max_tokens": 2}).status_code == 200
    finally:
        thread.stop()


def test_cli_serves_pinned_preload_and_adapter_dir(demo_dir, root, monkeypatch):
    apps = []
    monkeypatch.setattr("server.cli.run_server", lambda app, **kwargs: apps.append(app))
    assert main(["serve", "--model", demo_dir, "--kv-cache-memory", KV_CACHE, "--served-model-name", MODEL_NAME,
                 "--adapter", f"p={root / 'a3'}", "--pin", "p", "--adapter-dir", str(root),
                 "--admin-api-key", "adm", "--log-level", "warning"]) == 0
    thread = ServerThread(apps[0]).start()
    try:
        with httpx.Client(base_url=thread.url, timeout=30) as http:
            admin = {"Authorization": "Bearer adm"}
            assert text(complete(http, "a2")) and text(complete(http, "p", "x"))     # a2 just in time
            listed = {a["name"]: a for a in http.get("/v1/adapters", headers=admin).json()["data"]}
            assert listed["p"]["pinned"] and listed["p"]["tier"] == "device" and listed["a2"]["requests_served"] == 1
            assert http.get("/v1/adapters").status_code == 401
    finally:
        thread.stop()
