"""AdapterHub prefix tuning with `use_gating` (UniPELT's prefix; kind adapterhub_prefix_gated), gate taken at
prefill.

Besides the prefix generator (adapters/adapterhub_prefix.py) the checkpoint has one gate per layer:
    model.layers.N.self_attn.prefix_tuning.prefix_gates.NAME.weight   [1, hidden] ([2, hidden]: shared_gating false)
    model.layers.N.self_attn.prefix_tuning.prefix_gates.NAME.bias     [1] / [2]
and AdapterHub's PrefixTuningLayer.compose_single (methods/prefix_tuning.py) scales that layer's prefix keys by
g[0] and values by g[-1],  g = mean over the sequence of sigmoid(x @ weight.T + bias),  x the attention's input
(after input_layernorm), before concatenating them to the sequence's keys and values.

The prefix's K/V then differ per request, so they cannot be the adapter's shared blocks as they are. A request of
a gated kind (`whole_prompt_kinds`) gets its own copy of the prefix blocks at each (re-)admission
(server/kv_blocks.py), and at the step that prefills its prompt (or recomputes it after preemption), in each layer
before attention reads the cache, this runtime takes g over the prompt (adapters/gates.py; stored gates at a
recompute) and writes that layer's keys and values times g into the copy (`on_kv`). Decoding then reads the
scaled copy: the prompt's logits equal AdapterHub's forward; generated tokens keep the prompt's gate.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import torch

from adapters.adapterhub_lora import Gate
from adapters.adapterhub_prefix import AdapterHubPrefixRuntime
from adapters.bottleneck import read_adapterhub_weights
from adapters.config import ADAPTERHUB_PREFIX_GATED, CONFIG_NAME, AdapterError, read_config_json
from adapters.gates import GatedRequest, gated_requests, request_gate
from adapters.interface import AdaptableModel, AdapterRuntime, PrefixKV, StepLayout

_GATE = re.compile(r"^model\.layers\.(\d+)\.self_attn\.prefix_tuning\.prefix_gates\.([^.]+)\.(weight|bias)$")


@dataclass
class GatedPrefixKV(PrefixKV):
    """The prefix's K/V (as AdapterHubPrefixRuntime loads them) and each layer's gate."""
    gates: dict[int, Gate] = field(default_factory=dict)

    @property
    def num_bytes(self) -> int:
        return super().num_bytes + sum(g.num_bytes for g in self.gates.values())


@dataclass
class GatedPrefixStepView:
    requests: list[tuple[GatedRequest, torch.Tensor]]     # requests to scale this step, their prefix-copy rows


class GatedPrefixRuntime(AdapterRuntime):
    name = "adapterhub_prefix_gated"
    kinds = (ADAPTERHUB_PREFIX_GATED,)
    whole_prompt_kinds = (ADAPTERHUB_PREFIX_GATED,)
    evictable = False           # as every prefix runtime: a request binds to its adapter's KV blocks when added

    def __init__(self, model: AdaptableModel):
        self.model = model
        self.prefix = AdapterHubPrefixRuntime(model)
        weight = model.embed_tokens.weight
        self.dtype, self.device = weight.dtype, weight.device
        self.gates: dict[int, dict[int, Gate]] = {}          # slot -> layer -> gate
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}   # slot -> unscaled key, value [L, n, kvh, d]

    def load(self, path: str) -> GatedPrefixKV:
        tensors, file = read_adapterhub_weights(path)
        kv = self.load_part(path, read_config_json(path).get("config"), tensors, os.path.join(path, CONFIG_NAME))
        if tensors:
            raise AdapterError(f"{file}: unexpected tensor(s) {', '.join(sorted(tensors))}")
        return kv

    def load_part(self, path: str, config: dict, tensors: dict[str, torch.Tensor], source: str) -> GatedPrefixKV:
        if not isinstance(config, dict) or not config.get("use_gating"):
            raise AdapterError(f"{source}: not a gated prefix (use_gating)")
        heads = 1 if config.get("shared_gating", True) else 2
        raw: dict[int, dict[str, torch.Tensor]] = {}
        for key in [k for k in tensors if _GATE.match(k)]:
            m = _GATE.match(key)
            raw.setdefault(int(m[1]), {})[m[3]] = tensors.pop(key)
        kv = self.prefix.load_part(path, {k: v for k, v in config.items() if k != "use_gating"}, tensors, source)
        hidden, num_layers = self.model.spec.hidden_size, self.model.spec.num_layers
        if sorted(raw) != list(range(num_layers)):
            raise AdapterError(f"{source}: use_gating=True needs a prefix gate (prefix_gates) in each of the "
                               f"{num_layers} layers, found layers {sorted(raw)}")
        gates = {}
        for layer, p in raw.items():
            w, b = p.get("weight"), p.get("bias")
            if w is None or b is None or w.shape != (heads, hidden) or b.shape != (heads,):
                raise AdapterError(f"{source}: layer {layer} prefix gate: expected weight [{heads}, {hidden}] and "
                                   f"bias [{heads}] (shared_gating={heads == 1})")
            gates[layer] = Gate(w.float(), b.float())
        return GatedPrefixKV(kv.key, kv.value, kv.first_position, gates)

    def install(self, slot: int, weights: GatedPrefixKV) -> None:
        def cast(t):
            return t.to(device=self.device, dtype=self.dtype)
        self.gates[slot] = {layer: Gate(cast(g.weight), cast(g.bias)) for layer, g in weights.gates.items()}
        self.kv[slot] = (cast(weights.key), cast(weights.value))

    def remove(self, slot: int) -> None:
        self.gates.pop(slot, None)
        self.kv.pop(slot, None)

    def virtual_kv(self, weights: GatedPrefixKV) -> PrefixKV:
        """The unscaled prefix, in shared blocks: each request copies them (server/kv_blocks.py) and scales its copy."""
        return PrefixKV(weights.key, weights.value, weights.first_position)

    def step_view(self, layout: StepLayout) -> GatedPrefixStepView | None:
        """Only requests whose prefix copy is fresh this step (a prefill from their first token)."""
        requests = []
        by_row = {item.row: item for item in layout.items}
        for request in gated_requests(layout, self.name, set(self.gates)):
            slots = by_row[request.rows.start].virtual_slots
            if request.start == 0 and slots is not None:
                requests.append((request, torch.tensor(slots, dtype=torch.long, device=self.device)))
        return GatedPrefixStepView(requests) if requests else None

    def on_kv(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta, layer: int) -> None:
        for request, slots in meta.adapters[self.name].requests:
            gate = self.gates[request.slot].get(layer)
            if gate is None or request.first_layer > layer:
                continue
            g = request_gate(x[request.rows], request, layer, gate.weight, gate.bias)      # [1] or [2]
            key, value = self.kv[request.slot]
            for cache, kv, scale in ((k_cache, key, g[0]), (v_cache, value, g[-1])):
                cache.view(-1, *cache.shape[2:])[slots] = kv[layer] * scale     # from the unscaled prefix: idempotent
