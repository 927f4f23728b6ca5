"""Real uvicorn servers on 127.0.0.1 around a real LLMEngine on a tiny demo model."""
from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

import httpx
import pytest
import uvicorn

from server.api import build_app
from server.async_engine import AsyncEngine
from server.config import EngineConfig
from server.demo import ensure_demo_model
from server.engine import LLMEngine

MODEL_NAME = "demo"
TINY_MODEL = dict(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128,
                  vocab_size=1024, max_position_embeddings=512)
KV_CACHE = "1MiB"           # 128 blocks of 16 tokens for this model


class ServerThread:
    """uvicorn serving `app` in a background thread on a socket bound before it starts (no port race)."""

    def __init__(self, app):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


class GatedEngine:
    """An LLMEngine whose step() can be held (`gate.clear()`), slowed (`step_delay` seconds), or made to raise
    once (`fail_in_steps = n`: the n-th step from now raises)."""

    def __init__(self, engine: LLMEngine):
        self._engine = engine
        self.gate = threading.Event()
        self.gate.set()
        self.in_step = threading.Event()
        self.fail_in_steps: int | None = None
        self.step_delay = 0.0

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def step(self):
        self.in_step.set()
        try:
            self.gate.wait()
            time.sleep(self.step_delay)
            if self.fail_in_steps is not None:
                self.fail_in_steps -= 1
                if self.fail_in_steps == 0:
                    self.fail_in_steps = None
                    raise RuntimeError("injected step failure")
            return self._engine.step()
        finally:
            self.in_step.clear()


@dataclass
class Served:
    url: str
    engine: LLMEngine | GatedEngine
    async_engine: AsyncEngine

    def client(self, **kwargs) -> httpx.Client:
        kwargs.setdefault("timeout", 30)
        return httpx.Client(base_url=self.url, **kwargs)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> str:
    return ensure_demo_model(tmp_path_factory.mktemp("models") / "tiny-llama", **TINY_MODEL)


def make_engine(demo_dir: str, **config) -> LLMEngine:
    return LLMEngine(EngineConfig(model=demo_dir, served_model_name=MODEL_NAME, kv_cache_memory=KV_CACHE,
                                  **config))


def serve(engine, **app_kwargs):
    async_engine = AsyncEngine(engine)
    thread = ServerThread(build_app(async_engine, **app_kwargs)).start()
    return thread, Served(thread.url, engine, async_engine)


def serve_adapters(engine, adapter_dirs: dict):
    """serve() an engine with the adapters {name: dir} preloaded."""
    for name, path in adapter_dirs.items():
        engine.adapters.load(name, str(path))
    return serve(engine)


@pytest.fixture(scope="session")
def server(demo_dir):
    thread, served = serve(make_engine(demo_dir))
    yield served
    thread.stop()


@pytest.fixture(scope="session")
def gated_server(demo_dir):
    """max_waiting=2, an API key, and an engine step that tests can hold or make fail."""
    thread, served = serve(GatedEngine(make_engine(demo_dir, max_waiting=2)), api_key="sekret")
    yield served
    served.engine.gate.set()
    thread.stop()


@pytest.fixture(scope="session")
def reference_engine(demo_dir) -> LLMEngine:
    """A second engine on the same weights, driven directly (no HTTP) as the oracle."""
    return make_engine(demo_dir)


@pytest.fixture
def client(server):
    with server.client() as http:
        yield http


@pytest.fixture
def openai_client(server):
    import openai
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30) as oai:
        yield oai


def assert_serving(http: httpx.Client, headers: dict | None = None) -> None:
    """The server still answers a normal request."""
    response = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "x = ", "max_tokens": 2,
                                                  "temperature": 0, "ignore_eos": True}, headers=headers)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 2


def metric_value(text: str, name: str, labels: str = "") -> float | None:
    """The value of sample `name{labels}` in Prometheus text, or None."""
    prefix = f"{name}{{{labels}}} " if labels else f"{name} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix):])
    return None


def pytest_collection_modifyitems(items):
    """An exception in a test's helper thread fails that test instead of only warning."""
    strict = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
    for item in items:
        if "tests/http/" in item.nodeid:
            item.add_marker(strict)
