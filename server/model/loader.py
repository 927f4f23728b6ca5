"""Build a LlamaModel from an HF model directory (config.json + safetensors)."""
from __future__ import annotations

import re

import torch
from transformers import AutoConfig

from server.model.llama import LlamaModel, Linear
from server.model.quantize import QUANTIZE, PrequantizedWeights, check_quantization_config, quantize_model
from adapters.model_spec import ModelSpec
from server.model.weights import iter_weights

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# model.layers.3.self_attn.k_proj.weight -> (3, "self_attn", "k_proj", "weight")
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.(weight|bias)$")
_FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
          "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}


def resolve_dtype(name: str, spec: ModelSpec) -> torch.dtype:
    if name == "auto":
        name = (spec.torch_dtype or "float32").replace("torch.", "")
        if name not in DTYPES:
            name = "float32"
    return DTYPES[name]


def load_model(model_dir: str, dtype: str = "auto", quantize: str | None = None, double_quant: bool = False,
               device: str | torch.device = "cpu") -> tuple[LlamaModel, ModelSpec]:
    """The model in `dtype` (the compute dtype), its 4-bit layers already on `device` (the rest is moved by the
    caller). quantize="nf4": quantize the decoder linears at load as transformers + bitsandbytes do
    (`double_quant`: bnb_4bit_use_double_quant); a checkpoint saved pre-quantized by them loads as it is."""
    if quantize is not None and quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {QUANTIZE} or None, got {quantize!r}")
    hf_config = AutoConfig.from_pretrained(model_dir)
    spec = ModelSpec.from_hf(hf_config)
    torch_dtype = resolve_dtype(dtype, spec)
    prequantized = PrequantizedWeights() if check_quantization_config(
        _as_dict(getattr(hf_config, "quantization_config", None)), model_dir) else None
    model = LlamaModel(spec)
    params = dict(model.named_parameters())
    unfilled = {name: p.numel() for name, p in params.items()}
    for name, tensor in iter_weights(model_dir):
        if prequantized is not None and prequantized.take(name, tensor):
            continue
        target, rows = _target(model, name)
        if target is None:
            continue                                  # e.g. rotary inv_freq buffers in old checkpoints
        dest = params[target]
        view = dest.data if rows is None else dest.data.narrow(0, *rows)
        if view.shape != tensor.shape:
            raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != expected {tuple(view.shape)}")
        view.copy_(tensor)
        unfilled[target] -= tensor.numel()
    if prequantized is not None:
        for name in prequantized.install(model, lambda key: _target(model, key), torch_dtype, device):
            unfilled[name] = 0
    missing = [n for n, left in unfilled.items() if left]
    if missing:
        raise ValueError(f"checkpoint {model_dir} lacks weights for: {', '.join(missing[:8])}")
    model.to(torch_dtype)
    model.inv_freq = model.inv_freq.float()
    if quantize is not None and prequantized is None:
        quantize_model(model, double_quant, device)
    model.eval()
    return model, spec


def _as_dict(qcfg) -> dict | None:
    if qcfg is None or isinstance(qcfg, dict):
        return qcfg
    return qcfg.to_dict()


def _target(model: LlamaModel, name: str) -> tuple[str | None, tuple[int, int] | None]:
    """HF tensor name -> (our parameter name, (first row, rows) within a fused weight or None)."""
    if name == "model.embed_tokens.weight":
        return "embed_tokens.weight", None
    if name == "model.norm.weight":
        return "norm.weight", None
    if name == "lm_head.weight":
        return (None, None) if model.spec.tie_word_embeddings else ("lm_head.weight", None)
    m = re.match(r"^model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight$", name)
    if m:
        return f"layers.{m[1]}.{m[2]}.weight", None
    m = _LAYER_KEY.match(name)
    if not m:
        return None, None
    layer, block, proj, kind = m.groups()
    fused = _FUSED.get(proj, proj)
    linear: Linear = getattr(getattr(model.layers[int(layer)], block), fused)
    if proj not in linear.slices:
        return None, None
    return f"layers.{layer}.{block}.{fused}.{kind}", linear.slices[proj]
