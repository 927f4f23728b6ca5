"""PEFT-made adapters on the tiny test models, and the per-module check of our tensors against PEFT's forward."""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from transformers import AutoConfig

from adapters.lora import LoraAdapter, LoraEmbedding, LoraModule
from adapters.model_spec import ModelSpec
from tests.tiny_models import load_hf

ATOL = RTOL = 1e-5   # fp32, every comparison in this directory
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def randomize(peft_model, seed: int, std: float = 0.08) -> None:
    """PEFT starts lora_B (and AdaLoRA's E) at zero: give every adapter tensor random values, and move DoRA
    magnitudes away from ||W|| so the DoRA factor is not 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def make_adapter(base_dir: Path, config, out: Path, seed: int = 0, train=None) -> Path:
    """get_peft_model on the tiny model at `base_dir`, random adapter weights, optional `train(model)`,
    then save_pretrained to `out`."""
    torch.manual_seed(seed)
    model = get_peft_model(load_hf(base_dir), copy.deepcopy(config))
    randomize(model, seed)
    if train is not None:
        train(model)
    model.save_pretrained(out)
    return out


def reload_peft(base_dir: Path, adapter_dir: Path) -> PeftModel:
    """The reference: PEFT's own loading of the saved adapter."""
    return PeftModel.from_pretrained(load_hf(base_dir), adapter_dir).eval()


def spec_of(base_dir: Path) -> ModelSpec:
    return ModelSpec.from_hf(AutoConfig.from_pretrained(base_dir))


def base_weight_of(hf_model):
    """base_weight(layer, module) over an HF model (PEFT-wrapped or not): the frozen weight [out, in]."""
    def base_weight(layer, module):
        root = hf_model.get_base_model() if hasattr(hf_model, "get_base_model") else hf_model
        if module == "lm_head":
            m = root.lm_head
        elif module == "embed_tokens":
            m = root.model.embed_tokens
        else:
            block = root.model.layers[layer]
            m = getattr(block.self_attn if hasattr(block.self_attn, module) else block.mlp, module)
        return getattr(m, "base_layer", m).weight.detach()
    return base_weight


def peft_lora_modules(peft_model) -> dict[str, torch.nn.Module]:
    """HF module path ("model.layers.0.self_attn.q_proj", "lm_head") -> PEFT's LoRA layer."""
    root = peft_model.get_base_model()
    return {name: m for name, m in root.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}


def ours_linear(mod: LoraModule, base: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    y = x @ base.weight.T
    if mod.dora_scale is not None:
        y = mod.dora_scale * y
    y = y + (x @ mod.lora_a.T) @ mod.lora_b.T
    return y if base.bias is None else y + base.bias


def ours_embedding(emb: LoraEmbedding, base: torch.nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    h = base.weight[ids]
    if emb.dora_scale is not None:
        h = emb.dora_scale * h
    return h + emb.lora_a[ids] @ emb.lora_b.T


def assert_matches_peft(adapter: LoraAdapter, peft_model, seed: int = 0) -> list[str]:
    """Every PEFT LoRA layer's forward on random input == the base op transformed by our tensors; no module of
    ours is missing from PEFT. Returns the checked module paths."""
    g = torch.Generator().manual_seed(seed)
    layers = peft_lora_modules(peft_model)
    ours = {f"model.layers.{layer}.{'self_attn' if name in MODULES[:4] else 'mlp'}.{name}": mod
            for (layer, name), mod in adapter.modules.items()}
    if adapter.lm_head is not None:
        ours["lm_head"] = adapter.lm_head
    if adapter.embed is not None:
        ours["model.embed_tokens"] = adapter.embed
    assert set(ours) <= set(layers), sorted(set(ours) - set(layers))
    with torch.no_grad():
        for path, layer in layers.items():
            base = layer.base_layer
            mod = ours.get(path)
            if isinstance(base, torch.nn.Embedding):
                ids = torch.randint(0, base.num_embeddings, (7,), generator=g)
                want = layer(ids)
                got = base.weight[ids] if mod is None else ours_embedding(mod, base, ids)
            else:
                x = torch.randn(5, base.in_features, generator=g)
                want = layer(x)
                got = base(x) if mod is None else ours_linear(mod, base, x)
            torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL, msg=lambda m: f"{path}: {m}")
    return sorted(ours)
