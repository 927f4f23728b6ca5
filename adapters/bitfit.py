"""BitFit checkpoints (our format; no library writes one) -> per-module bias deltas.

BitFit fine-tunes only the biases of a model. A BitFit adapter directory holds
    adapter_config.json          {"peft_type": "BITFIT", "target_modules": [...] (optional),
                                  "base_model_name_or_path": ... (optional, recorded only)}
    adapter_model.safetensors    the fine-tuned biases, named like PEFT names module tensors:
                                 "base_model.model." + HF module path + ".bias", e.g.
                                 base_model.model.model.layers.0.self_attn.q_proj.bias   [q_proj out_features]
                                 base_model.model.lm_head.bias                           [vocab]
Any linear of the decoder (q/k/v/o_proj, gate/up/down_proj) and lm_head may carry one, whether or not the base
module has a bias (Qwen2's q/k/v have one, Llama's none: then the base bias counts as 0). The adapter's bias
REPLACES the base bias, as after a BitFit fine-tune: y = x @ W.T + b_adapter. A module without a tensor keeps
its base bias. `target_modules`, when given, is matched like LoRA's (names by suffix, or one regex) and every
tensor's module must match it; without it the tensor names alone say which modules carry a bias.
Served as a per-token gathered add of delta = b_adapter - b_base (adapters/bitfit_runtime.py).
`python -m adapters.tools.extract_bitfit` writes one from a fine-tuned model and its base.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Callable

import torch

from adapters.checkpoint import WEIGHTS_NAME, read_safetensors
from adapters.config import CONFIG_NAME, AdapterError, BitFitConfig, LoraConfig, load_config
from adapters.model_spec import ModelSpec

PREFIX = "base_model.model."
SUFFIX = ".bias"
_LAYER_MODULE = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)$")
BLOCKS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}

BaseBias = Callable[[int | None, str], "torch.Tensor | None"]


@dataclass
class BitFitAdapter:
    path: str
    delta: dict[tuple[int | None, str], torch.Tensor] = field(default_factory=dict)  # (layer, module) -> [out]
    # layer None = lm_head; delta = adapter bias - base bias (0 where the base has none), in float32

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.delta.values())


def module_path(layer: int | None, module: str) -> str:
    """(0, "q_proj") -> "model.layers.0.self_attn.q_proj"; (None, "lm_head") -> "lm_head"."""
    return "lm_head" if module == "lm_head" else f"model.layers.{layer}.{BLOCKS[module]}.{module}"


def tensor_name(layer: int | None, module: str) -> str:
    return PREFIX + module_path(layer, module) + SUFFIX


def load_bitfit(path: str, spec: ModelSpec, base_bias: BaseBias) -> BitFitAdapter:
    """The BitFit adapter in directory `path` for a base described by `spec`; base_bias(layer, module) -> the
    base module's bias [out] or None. AdapterError naming the file and the problem otherwise."""
    config = load_config(path)
    if not isinstance(config, BitFitConfig):
        raise AdapterError(f"{path}: peft_type {config.peft_type!r} is not a BitFit adapter")
    file = os.path.join(path, WEIGHTS_NAME)
    targets = None
    if config.target_modules is not None:
        if not isinstance(config.target_modules, (list, str)):
            raise AdapterError(f"{os.path.join(path, CONFIG_NAME)}: target_modules must be a list of names or a "
                               f"regex string, got {config.target_modules!r}")
        targets = LoraConfig(peft_type="LORA", r=1, lora_alpha=1, target_modules=config.target_modules).targets
    adapter = BitFitAdapter(path)
    for key, bias in sorted(read_safetensors(path).items()):
        if not (key.startswith(PREFIX) and key.endswith(SUFFIX)):
            raise AdapterError(f"{file}: unexpected key {key!r} (a BitFit checkpoint holds only "
                               f"base_model.model.<linear module>.bias, e.g. "
                               f"{tensor_name(0, 'q_proj')})")
        where = key[len(PREFIX):-len(SUFFIX)]
        layer, name = _locate(where, spec, file, key)
        if targets is not None and not targets(where):
            raise AdapterError(f"{file}: {key}: module {where} is not in target_modules={config.target_modules!r}")
        width = _out_features(spec, name)
        if tuple(bias.shape) != (width,):
            raise AdapterError(f"{file}: {key} has shape {list(bias.shape)}, expected [{width}] ({name}'s output "
                               f"features)")
        base = base_bias(layer, name)
        delta = bias.float() - (0 if base is None else base.detach().float().cpu())
        adapter.delta[(layer, name)] = delta.contiguous()
    if not adapter.delta:
        raise AdapterError(f"{file}: no bias tensors (expected base_model.model.<linear module>.bias)")
    return adapter


def _locate(where: str, spec: ModelSpec, file: str, key: str) -> tuple[int | None, str]:
    if where == "lm_head":
        return None, "lm_head"
    m = _LAYER_MODULE.match(where)
    if m is None or BLOCKS.get(m[3]) != m[2]:
        raise AdapterError(f"{file}: {key}: the {spec.model_type} base model has no linear module {where!r} "
                           f"(BitFit biases go on {', '.join(BLOCKS)} and lm_head)")
    layer = int(m[1])
    if layer >= spec.num_layers:
        raise AdapterError(f"{file}: {key}: layer {layer}, but the base model has {spec.num_layers} layers")
    return layer, m[3]


def _out_features(spec: ModelSpec, name: str) -> int:
    h, i = spec.hidden_size, spec.intermediate_size
    return {"q_proj": spec.q_size, "k_proj": spec.kv_size, "v_proj": spec.kv_size, "o_proj": h,
            "gate_proj": i, "up_proj": i, "down_proj": h, "lm_head": spec.vocab_size}[name]
