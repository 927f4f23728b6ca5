"""AdapterHub bottleneck adapters with `use_gating` (UniPELT's SeqBn; kind bottleneck_gated), gate taken at
prefill.

Besides the usual tensors (adapters/bottleneck.py) each module has
    model.layers.N.output_adapters.adapters.NAME.gate.weight   [1, hidden]
    model.layers.N.output_adapters.adapters.NAME.gate.bias     [1]
and AdapterHub's Adapter.forward (methods/modeling.py) multiplies the module's output f(x) (up projection, bias and
scaling included) by  g = mean over the sequence of sigmoid(x @ gate.weight.T + gate.bias),  x the adapter's input,
before its residual / layer norm:

    h = [LN_after](g * f(a_o o + a_r r) + e_o o + e_r r) + c_o o + c_r r       (BnMath.coefficients)

g is taken over the prompt at the request's first prefill and kept for its decoding (adapters/gates.py). Gated
adapters are computed per request (their g differs per request anyway), not grouped like ungated ones.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from adapters.adapterhub_lora import Gate
from adapters.bottleneck import (LN_EPS, LOCATIONS, BottleneckAdapter, BnModule, _module, parse_math,
                                 read_adapterhub_weights)
from adapters.config import BOTTLENECK_GATED, CONFIG_NAME, AdapterError, read_config_json
from adapters.gates import GatedRequest, gated_requests, request_gate
from adapters.interface import AdaptableModel, AdapterRuntime, StepLayout

_KEY = re.compile(r"^model\.layers\.(\d+)\.(attention_adapters|output_adapters)\.adapters\.([^.]+)\.(.+)$")


@dataclass
class GatedBottleneck:
    adapter: BottleneckAdapter
    gates: dict[tuple[int, str], Gate] = field(default_factory=dict)     # (layer, ATTENTION | MLP) -> its gate

    @property
    def rank(self) -> int:
        return self.adapter.rank

    @property
    def num_bytes(self) -> int:
        return self.adapter.num_bytes + sum(g.num_bytes for g in self.gates.values())


def gated_bottleneck_from(path: str, config, tensors: dict[str, torch.Tensor], source: str, file: str,
                          hidden: int, num_layers: int) -> GatedBottleneck:
    """The gated bottleneck of an AdapterHub "config" and the tensors: those it uses are popped from `tensors`."""
    if not isinstance(config, dict) or not config.get("use_gating"):
        raise AdapterError(f"{source}: not a gated bottleneck adapter (use_gating)")
    math_ = parse_math({k: v for k, v in config.items() if k != "use_gating"}, source)
    groups: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    names = set()
    for key in [k for k in tensors if _KEY.match(k)]:
        m = _KEY.match(key)
        layer = int(m[1])
        if layer >= num_layers:
            raise AdapterError(f"{file}: {key}: layer {layer} but the base model has {num_layers} layers")
        names.add(m[3])
        groups.setdefault((layer, LOCATIONS[m[2]]), {})[m[4]] = tensors.pop(key)
    if not groups:
        raise AdapterError(f"{file}: no bottleneck adapter tensors")
    if len(names) > 1:
        raise AdapterError(f"{file}: tensors of several adapters ({', '.join(sorted(names))}); expected one")
    out = GatedBottleneck(BottleneckAdapter(path, names.pop(), math_))
    for (layer, pos), params in sorted(groups.items()):
        ctx = f"{file}: layer {layer} {pos}"
        w, b = params.pop("gate.weight", None), params.pop("gate.bias", None)
        if w is None or b is None or w.dim() != 2 or w.shape[1] != hidden or b.shape != (w.shape[0],):
            raise AdapterError(f"{ctx}: use_gating=True needs gate.weight [heads, {hidden}] and gate.bias [heads]")
        out.gates[(layer, pos)] = Gate(w.float(), b.float())
        out.adapter.modules[(layer, pos)] = _module(params, math_, config.get("scaling", 1.0), hidden, ctx, None)
    return out


def load_gated_bottleneck(path: str, hidden: int, num_layers: int) -> GatedBottleneck:
    tensors, file = read_adapterhub_weights(path)
    source = os.path.join(path, CONFIG_NAME)
    out = gated_bottleneck_from(path, read_config_json(path).get("config"), tensors, source, file, hidden,
                                num_layers)
    if tensors:
        raise AdapterError(f"{file}: unexpected tensor(s) {', '.join(sorted(tensors))}")
    return out


@dataclass
class GatedBottleneckStepView:
    requests: list[GatedRequest]


class GatedBottleneckRuntime(AdapterRuntime):
    name = "bottleneck_gated"
    kinds = (BOTTLENECK_GATED,)
    whole_prompt_kinds = (BOTTLENECK_GATED,)

    def __init__(self, model: AdaptableModel):
        self.model = model
        weight = model.embed_tokens.weight
        self.dtype, self.device = weight.dtype, weight.device
        self.adapters: dict[int, GatedBottleneck] = {}

    def load(self, path: str) -> GatedBottleneck:
        return load_gated_bottleneck(path, self.model.spec.hidden_size, self.model.spec.num_layers)

    def load_part(self, path: str, config: dict, tensors: dict[str, torch.Tensor], source: str) -> GatedBottleneck:
        """The gated bottleneck of a union adapter (UniPELT's SeqBn)."""
        spec = self.model.spec
        return gated_bottleneck_from(path, config, tensors, source, path, spec.hidden_size, spec.num_layers)

    def install(self, slot: int, weights: GatedBottleneck) -> None:
        def cast(t):
            return None if t is None else t.to(device=self.device, dtype=self.dtype)
        adapter = BottleneckAdapter(weights.adapter.path, weights.adapter.name, weights.adapter.math)
        for key, m in weights.adapter.modules.items():
            norms = [None if pair is None else tuple(map(cast, pair)) for pair in (m.ln_before, m.ln_after)]
            adapter.modules[key] = BnModule(cast(m.down_w), cast(m.down_b), cast(m.up_w), cast(m.up_b), *norms)
        gates = {key: Gate(cast(g.weight), cast(g.bias)) for key, g in weights.gates.items()}
        self.adapters[slot] = GatedBottleneck(adapter, gates)

    def remove(self, slot: int) -> None:
        self.adapters.pop(slot, None)

    def step_view(self, layout: StepLayout) -> GatedBottleneckStepView | None:
        requests = gated_requests(layout, self.name, set(self.adapters))
        return GatedBottleneckStepView(requests) if requests else None

    def on_sublayer(self, name: str, x: torch.Tensor, residual: torch.Tensor, out: torch.Tensor, h: torch.Tensor,
                    meta, layer) -> None:
        for request in meta.adapters[self.name].requests:
            if request.first_layer > layer.layer:
                continue
            weights = self.adapters[request.slot]
            key = (layer.layer, name)
            module = weights.adapter.modules.get(key)
            if module is None:
                continue
            rows = request.rows
            h[rows] = gated_sublayer(out[rows], residual[rows], module, weights.adapter.math.coefficients,
                                     weights.adapter.math.activation,
                                     lambda a: request_gate(a, request, key, weights.gates[key].weight,
                                                            weights.gates[key].bias))


def gated_sublayer(o: torch.Tensor, r: torch.Tensor, module: BnModule, coefficients, activation, gate_of
                   ) -> torch.Tensor:
    """h for one request's rows o, r [N, hidden]; gate_of(x [N, hidden]) -> its g [1]."""
    a_o, a_r, e_o, e_r, c_o, c_r = coefficients
    x = a_o * o + a_r * r
    g = gate_of(x)
    y = x
    if module.ln_before is not None:
        y = F.layer_norm(y, y.shape[-1:], module.ln_before[0], module.ln_before[1], LN_EPS)
    u = activation(y @ module.down_w.T + module.down_b) @ module.up_w.T + module.up_b
    u = u * g
    if module.ln_after is not None:
        u = F.layer_norm(u + e_o * o + e_r * r, u.shape[-1:], module.ln_after[0], module.ln_after[1], LN_EPS)
    return u + c_o * o + c_r * r
