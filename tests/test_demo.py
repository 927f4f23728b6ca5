"""The demo model: a tiny HF Llama + BPE tokenizer that loads with plain transformers and is reproducible."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from server.demo import ensure_demo_model

TINY = dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64, vocab_size=512,
            max_position_embeddings=256)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return ensure_demo_model(tmp_path_factory.mktemp("demo") / "tiny", **TINY)


def test_loads_with_transformers(tiny_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert model.config.model_type == "llama"
    assert model.dtype == torch.float32
    assert model.config.num_hidden_layers == 2 and model.config.num_key_value_heads == 1
    assert len(tokenizer) == model.config.vocab_size == 512
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    assert model.config.eos_token_id == tokenizer.eos_token_id

    text = "def f(x):\n    return x + 1\n"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text                      # byte-level BPE round-trips
    logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), 512) and torch.isfinite(logits).all()


def test_chat_template(tiny_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                         tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")   # markers are single special tokens


def test_tokenizer_config_readable_by_older_transformers(tiny_dir):
    with open(os.path.join(tiny_dir, "tokenizer_config.json")) as f:
        config = json.load(f)
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "chat_template" in config


def test_deterministic_and_cached(tiny_dir, tmp_path):
    other = ensure_demo_model(tmp_path / "again", **TINY)
    for name in ("tokenizer.json", "config.json", "tokenizer_config.json"):
        with open(os.path.join(tiny_dir, name)) as a, open(os.path.join(other, name)) as b:
            assert a.read() == b.read(), name
    weights_a = load_file(os.path.join(tiny_dir, "model.safetensors"))
    weights_b = load_file(os.path.join(other, "model.safetensors"))
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)

    stamp = os.path.getmtime(os.path.join(other, "model.safetensors"))
    assert ensure_demo_model(tmp_path / "again", **TINY) == other                 # cached: not rebuilt
    assert os.path.getmtime(os.path.join(other, "model.safetensors")) == stamp
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]             # no temp dirs left behind


def test_default_location_honours_env(monkeypatch, tmp_path):
    from server.demo import default_cache_dir
    monkeypatch.setenv("PEFTSERVE_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "demo-llama"


def test_concurrent_first_runs(tmp_path):
    from concurrent.futures import ThreadPoolExecutor
    target = tmp_path / "race"
    with ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(lambda _: ensure_demo_model(target, **TINY), range(2)))
    assert paths == [str(target)] * 2
    AutoModelForCausalLM.from_pretrained(target)
    assert sorted(os.listdir(tmp_path)) == ["race"]
