"""The adapter interface (adapters/interface.py) from a runtime's side: a new adapter kind served through
adapters/catalog.py alone (the engine unchanged), its on_sublayer hook sees exactly the tensors its docstring
names at the places transformers has them, and what it writes reaches only its own requests."""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

import adapters.catalog as catalog
import adapters.config as config
import server.engine as engine_module
from adapters.interface import ATTENTION, MLP, AdapterRuntime
from adapters.token_vectors import vector_step_view
from server.config import EngineConfig
from server.engine import LLMEngine
from tests.test_lora_vs_peft import BASE, run_with_adapters
from tests.test_model_vs_hf import ATOL, hf_reference, make_prompts
from tests.tiny_models import load_hf


@dataclass
class Gain:
    """A made-up adapter kind: multiplies each sub-layer's output by (1 + gain) for its tokens."""
    gain: float
    num_bytes: int = 0


class GainRuntime(AdapterRuntime):
    name = "gain"
    kinds = ("gain",)

    def __init__(self, model):
        self.model = model
        self.gains: dict[int, float] = {}
        self.calls: list[tuple[str, int]] = []

    def load(self, path):
        return Gain(json.load(open(f"{path}/adapter_config.json"))["gain"])

    def install(self, slot, weights):
        self.gains[slot] = weights.gain

    def remove(self, slot):
        self.gains.pop(slot, None)

    def step_view(self, layout):
        return vector_step_view(layout, self.kinds, self.model.spec.num_layers, "cpu")

    def on_sublayer(self, name, x, residual, out, h, meta, layer):
        self.calls.append((name, layer.layer))
        norm = layer.input_layernorm if name == ATTENTION else layer.post_attention_layernorm
        assert torch.equal(x, norm(residual))
        assert torch.equal(h, residual + out)
        rows = meta.adapters[self.name].rows[layer.layer]
        if rows is None:
            return
        gain = torch.tensor([0.0, *(self.gains.get(s, 0.0) for s in range(max(self.gains, default=0) + 1))])
        g = gain[rows.index][:, None]
        h[rows.lo:rows.hi] = residual[rows.lo:rows.hi] + out[rows.lo:rows.hi] * (1 + g)


@pytest.fixture
def gain_engine(monkeypatch, tiny_model_dir, tmp_path):
    base = tiny_model_dir("qwen2")
    made = []

    def make_runtimes(model):
        made.append(GainRuntime(model))
        return [*catalog.make_runtimes(model), made[-1]]

    monkeypatch.setattr(engine_module, "make_runtimes", make_runtimes)
    monkeypatch.setitem(config.PEFT_KINDS, "GAIN", "gain")
    engine = LLMEngine(EngineConfig(model=str(base), dtype="float32", kv_cache_memory="4MiB", block_size=4))
    for name, gain in (("up", 0.5), ("down", -0.3)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({"peft_type": "GAIN", "gain": gain}))
        engine.adapters.load(name, str(tmp_path / name))
    return base, engine, made[0]


def hf_with_gain(base, gain: float):
    """transformers with each decoder layer's self_attn / mlp output scaled by (1 + gain)."""
    model = load_hf(base)
    for layer in model.model.layers:
        for module in (layer.self_attn, layer.mlp):
            module.register_forward_hook(
                lambda mod, args, output: ((output[0] * (1 + gain), *output[1:]) if isinstance(output, tuple)
                                           else output * (1 + gain)))
    return model


def test_a_new_kind_through_the_catalog_and_on_sublayer(gain_engine):
    base, engine, runtime = gain_engine
    assert engine.adapters.get("up").kind == "gain"
    names = ["up", BASE, "down", "up", BASE]
    prompts = make_prompts(51, [6, 11, 4, 9, 7])
    tokens, logits = run_with_adapters(engine, prompts, names, [0, 0, 1, 2, 2])
    references = {BASE: load_hf(base), "up": hf_with_gain(base, 0.5), "down": hf_with_gain(base, -0.3)}
    for i, (name, prompt) in enumerate(zip(names, prompts)):
        ref_tokens, ref_logits = hf_reference(references[name], prompt)
        assert tokens[i] == ref_tokens, (i, name)
        torch.testing.assert_close(logits[i], ref_logits, atol=ATOL, rtol=0)
    assert tokens[0] != hf_reference(references[BASE], prompts[0])[0]
    num_layers = engine.runner.spec.num_layers
    assert runtime.calls[:2 * num_layers] == [(n, i) for i in range(num_layers) for n in (ATTENTION, MLP)]


def test_hooks_of_a_kind_absent_from_the_step_are_not_called(gain_engine):
    base, engine, runtime = gain_engine
    run_with_adapters(engine, make_prompts(52, [5]), [BASE], [0])
    assert runtime.calls == []
