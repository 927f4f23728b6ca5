"""AdapterHub's LoRA (`LoRAConfig`, architecture "lora", composition_mode "add") -> our LoRA tensors, and its
optional gate (`use_gating`, set by UniPELT).

adapter_config.json: {"config": {"architecture": "lora", "composition_mode": "add", "r": R, "alpha": A,
"attn_matrices": ["q", "v"], "selfattn_lora", "intermediate_lora", "output_lora", "use_gating", ...}, "name": ...}.
The weights (adapter.safetensors or pytorch_adapter.bin), per adapted module:

    model.layers.0.self_attn.q_proj.loras.NAME.lora_A        [r, in]
    model.layers.0.self_attn.q_proj.loras.NAME.lora_B        [out, r]
    model.layers.0.self_attn.q_proj.loras.NAME.gate.weight   [1, in]     use_gating only
    model.layers.0.self_attn.q_proj.loras.NAME.gate.bias     [1]

AdapterHub's LoRA.forward (methods/lora.py) adds to the module's output, with x its input:
    ungated:  delta = x @ A.T @ B.T * (alpha / r)
    gated:    delta = x @ A.T @ B.T * g,   g = mean over the sequence of sigmoid(x @ gate.weight.T + gate.bias)
(no alpha / r when gated: the gate replaces the scaling). Which modules carry LoRA ("intermediate" is down_proj
on Llama, up_proj on Qwen2) is read from the tensor names, as for (IA)^3 (adapters/adapterhub_ia3.py).

The gate averages over the whole sequence, so a token's delta depends on later tokens; a KV-cached server takes
g over the prompt at its prefill and keeps it for every generated token (adapters/gates.py). The prompt's own
logits then equal AdapterHub's forward on the prompt; later tokens differ from AdapterHub's full re-forwards.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Callable

import torch

from adapters.bottleneck import read_adapterhub_weights
from adapters.config import CONFIG_NAME, AdapterError, LoraConfig, read_config_json
from adapters.lora import LoraAdapter, LoraModule

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PARAMS = ("lora_A", "lora_B", "gate.weight", "gate.bias")
_KEY = re.compile(r"^model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.loras\.([^.]+)\.(lora_A|lora_B|gate\.weight|"
                  r"gate\.bias)$")
UNSUPPORTED = {"use_dora": "AdapterHub's DoRA is not served", "vera_d": "VeRA is not served",
               "vera_b": "VeRA is not served"}

BaseWeight = Callable[[int | None, str], torch.Tensor]


@dataclass
class Gate:
    """g = mean over the prompt of sigmoid(x @ weight.T + bias): [heads] values per request."""
    weight: torch.Tensor        # [heads, in]
    bias: torch.Tensor          # [heads]

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight, self.bias))


@dataclass
class AdapterHubLora(LoraAdapter):
    """LoRA tensors in our layout (ungated: alpha / r folded into lora_b; gated: nothing folded) plus, when
    gated, one gate per adapted module: the delta of (layer, module) is multiplied by its request's g."""
    gates: dict[tuple[int, str], Gate] = field(default_factory=dict)

    @property
    def num_bytes(self) -> int:
        return super().num_bytes + sum(g.num_bytes for g in self.gates.values())


def is_adapterhub_lora(config: dict) -> bool:
    return config.get("architecture") == "lora" and config.get("composition_mode", "add") == "add"


def load_adapterhub_lora(adapter_dir: str, num_layers: int, base_weight: BaseWeight) -> AdapterHubLora:
    d = read_config_json(adapter_dir)
    tensors, file = read_adapterhub_weights(adapter_dir)
    return adapterhub_lora_from(d.get("config"), tensors, adapter_dir, num_layers, base_weight,
                                os.path.join(adapter_dir, CONFIG_NAME), file)


def take_lora_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pop the LoRA tensors (model.layers.N.<block>.<module>.loras.*) out of `tensors`: a union's LoRA part."""
    return {key: tensors.pop(key) for key in list(tensors) if _KEY.match(key)}


def adapterhub_lora_from(config, tensors: dict[str, torch.Tensor], path: str, num_layers: int,
                         base_weight: BaseWeight, source: str, file: str) -> AdapterHubLora:
    """The LoRA of an AdapterHub "config" object and its tensors (only LoRA keys: a union's caller picks them).
    base_weight(layer, module) -> [out, in] checks the shapes. AdapterError for anything not served exactly."""
    if not isinstance(config, dict) or not is_adapterhub_lora(config):
        raise AdapterError(f"{source}: not an AdapterHub LoRA adapter (architecture \"lora\" with "
                           f"composition_mode \"add\")")
    for key, why in UNSUPPORTED.items():
        if config.get(key) not in (None, False):
            raise AdapterError(f"{source}: unsupported option {key}={config[key]!r}: {why}")
    r, alpha = config.get("r", 8), config.get("alpha", 8)
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise AdapterError(f"{source}: r must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise AdapterError(f"{source}: alpha must be a number, got {alpha!r}")
    gated = bool(config.get("use_gating"))
    scaling = 1.0 if gated else alpha / r
    groups: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    names = set()
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None or m[2] not in MODULES:
            raise AdapterError(f"{file}: unexpected tensor {key!r} (AdapterHub LoRA holds "
                               f"model.layers.N.<self_attn|mlp>.<module>.loras.NAME.<lora_A|lora_B|gate.*>)")
        layer = int(m[1])
        if layer >= num_layers:
            raise AdapterError(f"{file}: {key}: layer {layer} but the base model has {num_layers} layers")
        names.add(m[3])
        groups.setdefault((layer, m[2]), {})[m[4]] = t
    if len(names) > 1:
        raise AdapterError(f"{file}: tensors of several adapters ({', '.join(sorted(names))}); expected one")
    if not groups:
        raise AdapterError(f"{file}: no LoRA tensors")
    lora_config = LoraConfig(peft_type="LORA", r=r, lora_alpha=alpha,
                             target_modules=sorted({module for _, module in groups}))
    adapter = AdapterHubLora(path, lora_config)
    for (layer, module), params in sorted(groups.items()):
        ctx = f"{file}: layer {layer} {module}"
        want = set(PARAMS) if gated else {"lora_A", "lora_B"}
        if set(params) != want:
            raise AdapterError(f"{ctx}: has {sorted(params)}, expected {sorted(want)}"
                               + (" (use_gating)" if gated else ""))
        out_features, in_features = base_weight(layer, module).shape
        a, b = params["lora_A"].float(), params["lora_B"].float()
        if a.shape != (r, in_features) or b.shape != (out_features, r):
            raise AdapterError(f"{ctx}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)}, expected "
                               f"({r}, {in_features}) / ({out_features}, {r})")
        adapter.modules[(layer, module)] = LoraModule(a, b * scaling)
        if gated:
            w, bias = params["gate.weight"].float(), params["gate.bias"].float()
            if w.dim() != 2 or w.shape[1] != in_features or bias.shape != (w.shape[0],):
                raise AdapterError(f"{ctx}: gate.weight {tuple(w.shape)} / gate.bias {tuple(bias.shape)} do not "
                                   f"fit {in_features} inputs")
            adapter.gates[(layer, module)] = Gate(w, bias)
    return adapter
