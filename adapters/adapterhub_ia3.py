"""AdapterHub's (IA)^3 (`IA3Config`): learned vectors that scale the outputs of linear layers.

adapter_config.json: {"config": {"architecture": "lora", "composition_mode": "scale", "r": 1, "alpha": A,
"selfattn_lora", "attn_matrices", "intermediate_lora", "output_lora", ...}, "name": ...}. The weights
(adapter.safetensors or pytorch_adapter.bin) hold one vector per scaled module:

    model.layers.0.self_attn.k_proj.loras.NAME.lora_B    [out_features, 1]

and AdapterHub's LoRALinear in "scale" mode computes  y = (x @ W.T + b) * (lora_B * alpha)  (methods/lora.py,
IA3.forward + com). Which modules carry a vector depends on the model: on Llama its "intermediate" location is
down_proj, on Qwen2 (the plugin interface) up_proj; the tensor names say which, so we read them, not the flags.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import torch

from adapters.bottleneck import read_adapterhub_weights
from adapters.config import CONFIG_NAME, AdapterError, read_config_json

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_KEY = re.compile(r"^model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.loras\.([^.]+)\.lora_B$")


@dataclass
class IA3Adapter:
    """Per-feature scales: `output[(layer, module)]` multiplies that HF module's output [out_features]
    (bias included); `input[(layer, module)]` its input [in_features] (PEFT's feed-forward modules)."""
    path: str
    output: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    input: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.output.values(), *self.input.values()))


def is_adapterhub_ia3(config: dict) -> bool:
    return config.get("architecture") == "lora" and config.get("composition_mode") == "scale"


def load_adapterhub_ia3(adapter_dir: str, out_features: dict[str, int], num_layers: int,
                        dtype: torch.dtype | None = None) -> IA3Adapter:
    """`out_features`: HF module name -> its output width in the base model. AdapterError for anything that is
    not AdapterHub (IA)^3 as its `IA3Config` writes it, or does not fit the base."""
    d = read_config_json(adapter_dir)
    source = os.path.join(adapter_dir, CONFIG_NAME)
    config = d.get("config")
    if not isinstance(config, dict) or not is_adapterhub_ia3(config):
        raise AdapterError(f"{source}: not an AdapterHub (IA)^3 adapter (architecture \"lora\" with "
                           f"composition_mode \"scale\")")
    if config.get("r", 1) != 1:
        raise AdapterError(f"{source}: composition_mode \"scale\" needs r=1, got r={config.get('r')!r}")
    for key, why in (("use_gating", "its gate averages over the whole sequence (UniPELT)"),
                     ("use_dora", "(IA)^3 has no DoRA form"), ("vera_d", "VeRA vectors are not (IA)^3"),
                     ("vera_b", "VeRA vectors are not (IA)^3")):
        if config.get(key) not in (None, False):
            raise AdapterError(f"{source}: unsupported option {key}={config[key]!r}: {why}")
    alpha = config.get("alpha", 1)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise AdapterError(f"{source}: alpha must be a number, got {alpha!r}")
    tensors, file = read_adapterhub_weights(adapter_dir)
    adapter = IA3Adapter(adapter_dir)
    names = set()
    for key, t in sorted(tensors.items()):
        m = _KEY.match(key)
        if m is None or m[2] not in MODULES:
            raise AdapterError(f"{file}: unexpected tensor {key!r} (an (IA)^3 checkpoint holds only "
                               f"model.layers.N.<attn|mlp>.<module>.loras.NAME.lora_B)")
        layer, module = int(m[1]), m[2]
        names.add(m[3])
        if layer >= num_layers:
            raise AdapterError(f"{file}: {key}: layer {layer} but the base model has {num_layers} layers")
        width = out_features[module]
        if t.shape not in ((width, 1), (width,)):
            raise AdapterError(f"{file}: {key} has shape {tuple(t.shape)}; {module} has {width} outputs")
        scale = t.float().reshape(-1) * float(alpha)
        adapter.output[(layer, module)] = scale.to(dtype or t.dtype)
    if len(names) > 1:
        raise AdapterError(f"{file}: tensors of several adapters ({', '.join(sorted(names))}); expected one")
    if not adapter.output:
        raise AdapterError(f"{file}: no (IA)^3 vectors")
    return adapter
