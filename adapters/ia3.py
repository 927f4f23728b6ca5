"""PEFT (IA)^3 checkpoints -> per-module scale vectors (adapters/adapterhub_ia3.IA3Adapter, the container
AdapterHub's (IA)^3 loads into too).

A key, worked: "base_model.model.model.layers.0.mlp.down_proj.ia3_l"
    "base_model.model."               PeftModel.base_model (IA3Model) . model (the HF model)
    "model.layers.0.mlp.down_proj"    HF module path: what target_modules / feedforward_modules match
    "ia3_l"                           the vector (PEFT drops the adapter name when saving)
"base_model.model.lm_head.base_layer.weight": a copy of the base head PEFT adds when lm_head is targeted,
accepted only if it equals the base.
A module in feedforward_modules scales its input: ia3_l [1, in], y = (x * l) @ W.T + b. Any other scales its
output, bias included: ia3_l [out, 1], y = (x @ W.T + b) * l. PEFT initialises every vector to 1.
"""
from __future__ import annotations

import os
import re
from typing import Callable

import torch

from adapters.adapterhub_ia3 import IA3Adapter
from adapters.checkpoint import WEIGHTS_NAME, read_safetensors
from adapters.config import CONFIG_NAME, AdapterError, IA3Config, LoraConfig, load_config
from adapters.lora import _check_base_copy
from adapters.model_spec import ModelSpec

PREFIX = "base_model.model."
SUFFIX = ".ia3_l"
BASE_COPY = ".base_layer.weight"
_LAYER_MODULE = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)$")
BLOCKS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def load_ia3(path: str, spec: ModelSpec, base_weight: Callable[[int | None, str], torch.Tensor],
             dtype: torch.dtype | None = None) -> IA3Adapter:
    """The PEFT IA3 adapter in directory `path` for a base described by `spec`; AdapterError for anything we
    cannot serve exactly. `output[(layer, module)]` [out] / `input[(layer, module)]` [in]; layer None = lm_head.
    base_weight(layer, module) -> the frozen base weight [out, in] (to check a saved copy of the head)."""
    config = load_config(path)
    source = os.path.join(path, CONFIG_NAME)
    if not isinstance(config, IA3Config):
        raise AdapterError(f"{path}: peft_type {config.peft_type!r} is not an (IA)^3 adapter")
    if config.fan_in_fan_out:
        raise AdapterError(f"{source}: fan_in_fan_out=True is for GPT-2 style Conv1D weights; "
                           f"Llama/Mistral/Qwen2 use nn.Linear")
    if config.modules_to_save:
        raise AdapterError(f"{source}: modules_to_save={config.modules_to_save!r} is not supported (it replaces "
                           f"whole base modules with trained copies)")
    file = os.path.join(path, WEIGHTS_NAME)
    adapter = IA3Adapter(path)
    targets = _target_matcher(config)
    for key, vector in sorted(read_safetensors(path).items()):
        if key == PREFIX + "lm_head" + BASE_COPY:
            base = base_weight(None, "embed_tokens" if spec.tie_word_embeddings else "lm_head")
            _check_base_copy(vector, base.detach().to("cpu"), f"{file}: {key}")
            continue
        if not (key.startswith(PREFIX) and key.endswith(SUFFIX)):
            raise AdapterError(f"{file}: unexpected key {key!r} (an (IA)^3 checkpoint holds only "
                               f"base_model.model.<linear module>.ia3_l)")
        module_path = key[len(PREFIX):-len(SUFFIX)]
        layer, name = _locate(module_path, spec, file)
        if not targets(module_path):
            raise AdapterError(f"{file}: {key}: adapter_config.json does not target {module_path} "
                               f"(target_modules={config.target_modules!r})")
        out_f, in_f = _base_shape(spec, name)
        feedforward = is_feedforward(config.feedforward_modules, module_path)
        expected = (1, in_f) if feedforward else (out_f, 1)
        if tuple(vector.shape) != expected:
            raise AdapterError(f"{file}: {key} has shape {list(vector.shape)}, expected {list(expected)} "
                               f"({'a feedforward module: its input' if feedforward else 'its output'} is scaled)")
        table = adapter.input if feedforward else adapter.output
        table[(layer, name)] = vector.reshape(-1).to(dtype or vector.dtype).contiguous()
    if not adapter.input and not adapter.output:
        raise AdapterError(f"{file}: no (IA)^3 vectors (ia3_l) found")
    return adapter


def is_feedforward(feedforward_modules, module_path: str) -> bool:
    """PEFT's IA3Model._check_target_module_feedforward: a regex full-matched, or a list matched by suffix."""
    if not feedforward_modules:
        return False
    if isinstance(feedforward_modules, str):
        return re.fullmatch(feedforward_modules, module_path) is not None
    return any(module_path.endswith(target) for target in feedforward_modules)


def _target_matcher(config: IA3Config):
    """PEFT matches IA3 targets like LoRA ones (check_target_module_exists), without a layer filter."""
    as_lora = LoraConfig(peft_type="LORA", r=1, lora_alpha=1, target_modules=config.target_modules,
                         exclude_modules=config.exclude_modules)
    return as_lora.targets


def _locate(module_path: str, spec: ModelSpec, file: str) -> tuple[int | None, str]:
    """"model.layers.3.mlp.down_proj" -> (3, "down_proj"); "lm_head" -> (None, "lm_head")."""
    if module_path == "lm_head":
        return None, "lm_head"
    m = _LAYER_MODULE.match(module_path)
    if m is None or BLOCKS.get(m[3]) != m[2]:
        raise AdapterError(f"{file}: names module {module_path!r}, which the {spec.model_type} base model does not "
                           f"have as a linear layer ((IA)^3 can scale {', '.join(BLOCKS)} and lm_head)")
    layer = int(m[1])
    if layer >= spec.num_layers:
        raise AdapterError(f"{file}: names layer {layer} ({module_path}) but the base model has "
                           f"{spec.num_layers} layers")
    return layer, m[3]


def _base_shape(spec: ModelSpec, name: str) -> tuple[int, int]:
    h, i = spec.hidden_size, spec.intermediate_size
    return {"q_proj": (spec.q_size, h), "k_proj": (spec.kv_size, h), "v_proj": (spec.kv_size, h),
            "o_proj": (h, spec.q_size), "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i),
            "lm_head": (spec.vocab_size, h)}[name]
