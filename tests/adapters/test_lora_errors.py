"""Bad LoRA checkpoints: each raises AdapterError with a message naming the file and the problem."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import AdaLoraConfig, LoraConfig
from safetensors.torch import load_file, save_file

from adapters.config import AdapterError
from adapters.lora import load_lora
from tests.adapters.peft_helpers import base_weight_of, make_adapter, spec_of
from tests.tiny_models import load_hf

Q0 = "base_model.model.model.layers.0.self_attn.q_proj"
WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def good(tiny_model_dir, tmp_path_factory):
    """(base dir, a DoRA-free q/v adapter with embeddings, a DoRA q adapter)."""
    base = tiny_model_dir("llama")
    root = tmp_path_factory.mktemp("bad-lora")
    plain = make_adapter(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"]),
                         root / "plain")
    dora = make_adapter(base, LoraConfig(r=4, target_modules=["q_proj"], use_dora=True), root / "dora")
    return base, plain, dora


@pytest.fixture(scope="module")
def base_weight(good):
    return base_weight_of(load_hf(good[0]))


def variant(src, tmp_path, tensors=None, config=None):
    """A copy of adapter dir `src` with its tensors / config dict passed through the given edit functions."""
    dst = tmp_path / "variant"
    shutil.copytree(src, dst)
    if tensors is not None:
        t = load_file(dst / WEIGHTS)
        tensors(t)
        save_file(t, dst / WEIGHTS)
    if config is not None:
        c = json.loads((dst / "adapter_config.json").read_text())
        config(c)
        (dst / "adapter_config.json").write_text(json.dumps(c))
    return dst


def rename(old_part, new_part):
    def edit(t):
        for k in [k for k in t if old_part in k]:
            t[k.replace(old_part, new_part)] = t.pop(k)
    return edit


def setter(key, fn):
    def edit(t):
        t[key] = fn(t[key])
    return edit


def expect_error(path, good, base_weight, *needles):
    with pytest.raises(AdapterError) as err:
        load_lora(str(path), spec_of(good[0]), base_weight)
    msg = str(err.value)
    for needle in needles:
        assert needle in msg, msg
    return msg


TENSOR_CASES = {
    "layer_out_of_range": (rename("layers.0.", "layers.7."), ["layer 7", "3 layers"]),
    "unknown_module": (rename("self_attn.q_proj", "self_attn.qkv_proj"), ["qkv_proj", "does not have"]),
    "untargeted_module": (rename("self_attn.q_proj", "self_attn.k_proj"), ["k_proj", "does not target"]),
    "in_features": (setter(f"{Q0}.lora_A.weight", lambda a: a[:, :32].contiguous()), ["shape mismatch", "input"]),
    "out_features": (setter(f"{Q0}.lora_B.weight", lambda b: b[:40].contiguous()), ["shape mismatch", "output"]),
    "rank_a_vs_b": (setter(f"{Q0}.lora_B.weight", lambda b: b[:, :3].contiguous()), ["rank mismatch", "r=3"]),
    "rank_vs_config": (lambda t: [setter(f"{Q0}.lora_{x}.weight", lambda w, x=x: (w[:2] if x == "A" else w[:, :2])
                                         .contiguous())(t) for x in "AB"], ["rank mismatch", "r=2", "r=4"]),
    "int_dtype": (setter(f"{Q0}.lora_A.weight", lambda a: (a * 100).to(torch.int32)), ["dtype", "torch.int32"]),
    "nan": (setter(f"{Q0}.lora_B.weight", lambda b: b.index_put((torch.tensor(0), torch.tensor(1)),
                                                               torch.tensor(float("nan")))), ["NaN"]),
    "inf": (setter(f"{Q0}.lora_A.weight", lambda a: a.index_fill(0, torch.tensor([0]), float("inf"))), ["inf"]),
    "incomplete": (lambda t: t.pop(f"{Q0}.lora_B.weight"), ["incomplete", "lora_B.weight"]),
    "lora_bias": (lambda t: t.update({f"{Q0}.lora_B.bias": torch.zeros(64)}), ["lora_bias"]),
    "foreign_prefix": (rename("base_model.model.model.layers.0", "transformer.h.0"), ["unexpected key"]),
    "adapter_name_in_key": (rename("q_proj.lora_A.weight", "q_proj.lora_A.default.weight"), ["unexpected key"]),
    "embed_copy_differs": (setter("base_model.model.model.embed_tokens.base_layer.weight", lambda w: w + 1),
                           ["embed_tokens", "differs"]),
    "embed_resized": (setter("base_model.model.model.embed_tokens.base_layer.weight", lambda w: w[:500]),
                      ["embed_tokens", "resized"]),
    "embed_rank": (setter("base_model.model.model.embed_tokens.lora_embedding_B", lambda b: b[:, :2].contiguous()),
                   ["embed_tokens", "rank mismatch"]),
}


@pytest.mark.parametrize("case", sorted(TENSOR_CASES))
def test_bad_tensors(case, good, base_weight, tmp_path):
    edit, needles = TENSOR_CASES[case]
    path = variant(good[1], tmp_path, tensors=edit)
    expect_error(path, good, base_weight, WEIGHTS, *needles)


CONFIG_CASES = {
    "fan_in_fan_out": (lambda c: c.update(fan_in_fan_out=True), ["fan_in_fan_out", "Conv1D"]),
    "bias_all": (lambda c: c.update(bias="all"), ["bias='all'"]),
    "pissa": (lambda c: c.update(init_lora_weights="pissa_niter_4"), ["pissa", "base weights"]),
    "modules_to_save": (lambda c: c.update(modules_to_save=["lm_head"]), ["modules_to_save"]),
    "layer_replication": (lambda c: c.update(layer_replication=[[0, 2], [1, 3]]), ["layer_replication"]),
    "missing_r": (lambda c: c.pop("r"), ["missing required", "r"]),
    "rank_pattern": (lambda c: c.update(rank_pattern={"q_proj": 8}), ["rank mismatch", "r=8"]),
    "layers_to_transform": (lambda c: c.update(layers_to_transform=[1, 2]), ["does not target"]),
    "not_lora": (lambda c: c.update(peft_type="IA3"), ["not a LoRA adapter"]),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config(case, good, base_weight, tmp_path):
    edit, needles = CONFIG_CASES[case]
    expect_error(variant(good[1], tmp_path, config=edit), good, base_weight, *needles)


def test_dora_magnitude_missing_or_misshapen(good, base_weight, tmp_path):
    key = f"{Q0}.lora_magnitude_vector"
    expect_error(variant(good[2], tmp_path, tensors=lambda t: t.pop(key)), good, base_weight,
                 "incomplete", "lora_magnitude_vector")
    shutil.rmtree(tmp_path / "variant")
    expect_error(variant(good[2], tmp_path, tensors=setter(key, lambda m: m[:10])), good, base_weight,
                 "lora_magnitude_vector", "(10,)")
    shutil.rmtree(tmp_path / "variant")
    expect_error(variant(good[2], tmp_path, config=lambda c: c.update(use_dora=False)), good, base_weight,
                 "unexpected tensor", "lora_magnitude_vector")


def test_truncated_and_corrupt_files(good, base_weight, tmp_path):
    path = variant(good[1], tmp_path)
    data = (path / WEIGHTS).read_bytes()
    for broken in (data[:-100], data[:20], b"", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      "):
        (path / WEIGHTS).write_bytes(broken)
        expect_error(path, good, base_weight, str(path / WEIGHTS), "truncated or corrupt")


def test_pickle_only_or_no_weights(good, base_weight, tmp_path):
    path = variant(good[1], tmp_path)
    (path / WEIGHTS).unlink()
    expect_error(path, good, base_weight, "no adapter_model.safetensors")
    (path / "adapter_model.bin").write_bytes(b"not loaded, never unpickled")
    expect_error(path, good, base_weight, "adapter_model.bin", "pickle")


def test_no_lora_tensors(good, base_weight, tmp_path):
    path = variant(good[1], tmp_path, tensors=lambda t: [t.pop(k) for k in list(t) if "lora_" in k])
    expect_error(path, good, base_weight, "no LoRA weights")


def test_other_base_model_name_is_only_recorded(good, base_weight, tmp_path):
    path = variant(good[1], tmp_path, config=lambda c: c.update(base_model_name_or_path="someone/other-model",
                                                                 some_future_field={"x": 1}))
    adapter = load_lora(str(path), spec_of(good[0]), base_weight)
    assert adapter.config.base_model_name_or_path == "someone/other-model"
    assert len(adapter.modules) == 6 and adapter.embed is not None


def test_adalora_tensors_must_match_rank_pattern(good, base_weight, tmp_path):
    ada = make_adapter(good[0], AdaLoraConfig(init_r=4, total_step=10, target_modules=["q_proj"]), tmp_path / "ada")
    mask = {"model.layers.0.self_attn.q_proj.lora_E": [True, False, True, True]}
    expect_error(variant(ada, tmp_path, config=lambda c: c.update(rank_pattern=mask)), good, base_weight,
                 "model.layers.0.self_attn.q_proj", "rank mismatch", "r=4", "r=3", "rank_pattern")
    shutil.rmtree(tmp_path / "variant")
    expect_error(variant(ada, tmp_path, tensors=setter(f"{Q0}.lora_E", lambda e: e[:, 0].contiguous())), good,
                 base_weight, "lora_E has shape (4,)")
