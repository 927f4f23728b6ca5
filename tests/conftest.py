from __future__ import annotations

import pytest

from server.demo import _save_tokenizer, _train_tokenizer
from tests.tiny_models import save_tiny_model


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    _save_tokenizer(_train_tokenizer(512), path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir):
    """tiny_model_dir(kind) -> path of a saved tiny HF checkpoint (cached per session)."""
    cache = {}

    def make(kind: str):
        if kind not in cache:
            cache[kind] = save_tiny_model(kind, tmp_path_factory.mktemp(kind), tokenizer_dir)
        return cache[kind]
    return make
