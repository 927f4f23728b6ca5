"""load_lora on adapters made by PEFT itself: per module, our folded tensors reproduce PEFT's forward (fp32)."""
from __future__ import annotations

import pytest
import torch
from peft import AdaLoraConfig, LoraConfig

from adapters.config import LORA, detect_kind
from adapters.lora import load_lora
from server.model.loader import load_model
from tests.adapters.peft_helpers import (assert_matches_peft, base_weight_of, make_adapter, peft_lora_modules,
                                         reload_peft, spec_of)

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CASES = {
    # name: (base kind, PEFT config, module paths we must hold)
    "qv_alpha": ("llama", LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]), 6),
    "all_linear_rslora": ("qwen2", LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True), 21),
    "patterns_layers": ("mistral", LoraConfig(
        r=16, lora_alpha=32, target_modules=["o_proj", "gate_proj", "down_proj", "k_proj"],
        rank_pattern={"down_proj": 2, "layers.2.self_attn.k_proj": 6, "^model.layers.0.mlp.gate_proj": 3},
        alpha_pattern={"gate_proj": 5, r"layers\.2\.self_attn\.o_proj": 64}, layers_to_transform=[0, 2]), 8),
    "layers_pattern_int": ("llama", LoraConfig(r=4, target_modules=ALL, layers_to_transform=1,
                                               layers_pattern="layers"), 7),
    "regex_exclude": ("llama", LoraConfig(r=4, lora_alpha=3, target_modules=r".*\.(q_proj|up_proj|down_proj)",
                                          exclude_modules=["model.layers.1.mlp.up_proj"]), 8),
    "dora_bias": ("qwen2", LoraConfig(r=4, lora_alpha=8, target_modules=ALL, use_dora=True), 21),
    "dora_rslora_patterns": ("llama", LoraConfig(r=8, lora_alpha=4, target_modules=["q_proj", "down_proj"],
                                                 use_dora=True, use_rslora=True, rank_pattern={"q_proj": 2},
                                                 alpha_pattern={"down_proj": 11}), 6),
    "embed_lm_head": ("llama", LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head", "v_proj"]),
                      5),
    "tied_embed_lm_head": ("llama3", LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head"]), 2),
    # never trained: no rank_pattern, every module keeps init_r ranks
    "adalora_untrained": ("qwen2", AdaLoraConfig(init_r=4, total_step=10, lora_alpha=6,
                                                 target_modules=["k_proj", "o_proj", "gate_proj"]), 9),
    "dora_embed_lm_head": ("llama", LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head"],
                                               use_dora=True), 2),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_peft(case, tiny_model_dir, tmp_path):
    kind, config, num_parts = CASES[case]
    base_dir = tiny_model_dir(kind)
    adapter_dir = make_adapter(base_dir, config, tmp_path / case, seed=len(case))
    assert detect_kind(adapter_dir) == LORA
    peft_model = reload_peft(base_dir, adapter_dir)
    adapter = load_lora(str(adapter_dir), spec_of(base_dir), base_weight_of(peft_model))
    assert len(assert_matches_peft(adapter, peft_model)) == num_parts
    assert adapter.num_bytes == sum(t.numel() * 4 for p in adapter.parts()
                                    for t in (p.lora_a, p.lora_b, p.dora_scale) if t is not None)
    assert all(p.lora_a.dtype == torch.float32 for p in adapter.parts())


def test_patterns_give_per_module_ranks(tiny_model_dir, tmp_path):
    kind, config, _ = CASES["patterns_layers"]
    adapter_dir = make_adapter(tiny_model_dir(kind), config, tmp_path / "a")
    adapter = load_lora(str(adapter_dir), spec_of(tiny_model_dir(kind)), base_weight_of(reload_peft(
        tiny_model_dir(kind), adapter_dir)))
    ranks = {key: m.lora_a.shape[0] for key, m in adapter.modules.items()}
    assert ranks == {(0, "k_proj"): 16, (0, "o_proj"): 16, (0, "gate_proj"): 3, (0, "down_proj"): 2,
                     (2, "k_proj"): 6, (2, "o_proj"): 16, (2, "gate_proj"): 16, (2, "down_proj"): 2}
    assert adapter.rank == 16


def test_dora_with_our_model_base_weight(tiny_model_dir, tmp_path):
    """The engine's own base_weight (views into fused qkv / gate_up weights) gives the same DoRA factors."""
    base_dir = tiny_model_dir("qwen2")
    adapter_dir = make_adapter(base_dir, CASES["dora_bias"][1], tmp_path / "d", seed=3)
    model, spec = load_model(str(base_dir), dtype="float32")
    adapter = load_lora(str(adapter_dir), spec, model.base_weight)
    assert_matches_peft(adapter, reload_peft(base_dir, adapter_dir))
    assert all(m.dora_scale is not None and m.dora_scale.shape == (m.lora_b.shape[0],)
               for m in adapter.modules.values())


def test_zero_lora_b_modules_are_dropped(tiny_model_dir, tmp_path):
    """PEFT's default init (B = 0) is a no-op adapter; zero ranks and empty modules are dropped."""
    base_dir = tiny_model_dir("llama")
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])

    def zero_some(model):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "layers.0." in name and "lora_B" in name:
                    p.zero_()
                elif "layers.1.self_attn.q_proj.lora_B" in name:
                    p[:, 1:3] = 0
    adapter_dir = make_adapter(base_dir, config, tmp_path / "z", train=zero_some)
    peft_model = reload_peft(base_dir, adapter_dir)
    adapter = load_lora(str(adapter_dir), spec_of(base_dir), base_weight_of(peft_model))
    assert sorted(adapter.modules) == [(1, "q_proj"), (1, "v_proj"), (2, "q_proj"), (2, "v_proj")]
    assert adapter.modules[(1, "q_proj")].lora_a.shape == (2, 64)
    assert_matches_peft(adapter, peft_model)


def test_dtype_argument(tiny_model_dir, tmp_path):
    base_dir = tiny_model_dir("llama")
    adapter_dir = make_adapter(base_dir, CASES["qv_alpha"][1], tmp_path / "b")
    adapter = load_lora(str(adapter_dir), spec_of(base_dir), base_weight_of(reload_peft(base_dir, adapter_dir)),
                        dtype=torch.bfloat16)
    assert all(p.lora_a.dtype == p.lora_b.dtype == torch.bfloat16 for p in adapter.parts())


def adalora_train(steps: int = 10):
    def train(model):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
        g = torch.Generator().manual_seed(0)
        for step in range(steps):
            ids = torch.randint(3, 512, (2, 12), generator=g)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            model.base_model.update_and_allocate(step)
            opt.zero_grad()
    return train


def test_adalora_pruned_ranks(tiny_model_dir, tmp_path):
    base_dir = tiny_model_dir("llama")
    config = AdaLoraConfig(init_r=6, target_r=2, tinit=2, tfinal=3, deltaT=1, total_step=10, lora_alpha=12,
                           target_modules=["q_proj", "v_proj", "down_proj", "up_proj"])
    adapter_dir = make_adapter(base_dir, config, tmp_path / "ada", seed=1, train=adalora_train())
    assert detect_kind(adapter_dir) == LORA
    peft_model = reload_peft(base_dir, adapter_dir)
    saved_ranks = {name: m.lora_A["default"].shape[0] for name, m in peft_lora_modules(peft_model).items()}
    assert min(saved_ranks.values()) < 6, saved_ranks            # the budget pruned some ranks
    adapter = load_lora(str(adapter_dir), spec_of(base_dir), base_weight_of(peft_model))
    assert_matches_peft(adapter, peft_model)
    assert 0 < adapter.rank <= 6
    for (layer, name), mod in adapter.modules.items():
        path = f"model.layers.{layer}.{'self_attn' if name.endswith(('q_proj', 'v_proj')) else 'mlp'}.{name}"
        assert mod.lora_a.shape[0] <= saved_ranks[path]
