"""AdapterHub AdapterFusion (`Fuse("a", "b", ...)` over bottleneck adapters): config, checkpoint -> weights, and
the literal per-fusion torch reference.

A fusion directory is what `model.save_adapter_fusion(dir, "a,b")` of `adapters` 1.x writes:
`adapter_fusion_config.json` {"config": {...AdapterFusionConfig...}, "adapter_names": ["a", "b"], "name": "a,b",
...} and `model_adapter_fusion.safetensors` (or `pytorch_model_adapter_fusion.bin`), keys like

    model.layers.3.output_adapters.adapter_fusion_layer.a,b.query.weight   [hidden, hidden]   (and .bias)
    model.layers.3.output_adapters.adapter_fusion_layer.a,b.key.weight     [hidden, hidden]   (and .bias)
    model.layers.3.output_adapters.adapter_fusion_layer.a,b.value.weight   [hidden, hidden]   (no bias)

It holds no member weights: AdapterHub fuses adapters already loaded under the names in `adapter_names`, so we
resolve those names against the adapters already loaded (adapters/fusion_runtime.py) and copy their modules in.

The math of one sub-layer position (bottleneck.py's o, r; `compose_fuse` + BertFusion.forward + post_forward of
adapters/methods/{bottleneck,modeling}.py, eval mode; "last" is the last member, whose pre/post_forward frame the
fusion; a member contributes only its `up`, so its own ln_after / residual options do not enter):

    x  = o + r (original_ln_before) | o              sequential last;   x = r   parallel last
    up_m = f_m(x)  for each member m                  f_m(x) = up_m(act_m(down_m(LN_before_m(x)))) * scaling_m
    q = query(x);  k_m = key(up_m);  v_m = value(up_m)          (an option set false: that projection is identity)
    p = softmax_m(q . k_m);   ctx = sum_m p_m v_m     (value_before_softmax false: ctx = value(sum_m p_m up_m))
    h = ctx + res + (r if original_ln_after)          res = o (residual_before_ln) | x;   parallel last: res = r + o

which is  h = ctx + c_o o + c_r r  with x = a_o o + a_r r (`FusionAdapter.coefficients`).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from adapters.bottleneck import (ATTENTION, LN_EPS, LOCATIONS, BnMath, BnModule, BottleneckAdapter,
                                 read_adapterhub_weights)
from adapters.config import FUSION_CONFIG_NAME, AdapterError

SAFETENSORS_NAME = "model_adapter_fusion.safetensors"
PICKLE_NAME = "pytorch_model_adapter_fusion.bin"

# AdapterFusionConfig options that, when true, change the eval forward in a way we do not serve -> why
UNSUPPORTED = {
    "temperature": "its softmax temperature starts at 50 and drops on every forward call, so AdapterHub's output "
                   "depends on how many forwards ran before",
    "residual_before": "adding the residual to the members' outputs before the attention is not served",
    "query_before_ln": "a query taken before the residual add is not served",
}


@dataclass(frozen=True)
class FusionConfig:
    name: str                       # AdapterHub's fusion name, "a,b": the key segment of its tensors
    adapter_names: tuple[str, ...]  # the members, in Fuse order (the last one frames the fusion)
    query: bool = True
    key: bool = True
    value: bool = True
    value_before_softmax: bool = True


@dataclass
class FusionModule:
    """One (layer, position): the members' modules (in member order) and the fusion attention's projections
    (y = x @ w.T + b; None where the option is false)."""
    members: list[BnModule]
    query: tuple[torch.Tensor, torch.Tensor] | None        # ([hidden, hidden], [hidden])
    key: tuple[torch.Tensor, torch.Tensor] | None
    value: torch.Tensor | None                               # [hidden, hidden], no bias

    def tensors(self) -> list[torch.Tensor]:
        own = [t for pair in (self.query, self.key) if pair for t in pair] + ([self.value] if self.value is not None
                                                                            else [])
        return own + [t for m in self.members for t in m.tensors()]


@dataclass
class FusionAdapter:
    """A fusion with its own copies of its members' modules: evicting or unloading a member cannot break it (the
    cost: the members' weights are on the device twice while they are also served alone)."""
    path: str
    config: FusionConfig
    member_math: list[BnMath]
    modules: dict[tuple[int, str], FusionModule] = field(default_factory=dict)   # (layer, position) -> module

    @property
    def last_math(self) -> BnMath:
        return self.member_math[-1]

    @property
    def coefficients(self) -> tuple[float, float, float, float]:
        """(a_o, a_r, c_o, c_r) of  x = a_o o + a_r r,  h = ctx + c_o o + c_r r  (the module docstring)."""
        m = self.last_math
        r_after = 1.0 if m.original_ln_after else 0.0
        if m.is_parallel:
            return 0.0, 1.0, 1.0, 1.0 + r_after
        x = (1.0, 1.0 if m.original_ln_before else 0.0)
        res = (1.0, 0.0) if m.residual_before_ln else x
        return x[0], x[1], res[0], res[1] + r_after

    @property
    def rank(self) -> int:
        return max(b.rank for m in self.modules.values() for b in m.members)

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for m in self.modules.values() for t in m.tensors())


def read_fusion_config(fusion_dir: str) -> FusionConfig:
    """The FusionConfig of an AdapterHub fusion directory; AdapterError naming an option we do not serve."""
    path = os.path.join(fusion_dir, FUSION_CONFIG_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{path}: cannot read: {e}") from None
    if not isinstance(d, dict) or not isinstance(d.get("config"), dict):
        raise AdapterError(f"{path}: expected a JSON object with a \"config\" object")
    name = d.get("name")
    names = d.get("adapter_names", name.split(",") if isinstance(name, str) else None)   # AdapterFusionLoader
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise AdapterError(f"{path}: adapter_names must be a non-empty list of adapter names, got {names!r}")
    if not isinstance(name, str):
        name = ",".join(names)
    config = d["config"]
    for key, why in UNSUPPORTED.items():
        if config.get(key) not in (None, False):
            raise AdapterError(f"{path}: unsupported option {key}={config[key]!r}: {why}")
    flags = {}
    for key in ("query", "key", "value", "value_before_softmax"):
        value = config.get(key, True)
        if not isinstance(value, bool):
            raise AdapterError(f"{path}: option {key} must be true or false, got {value!r}")
        flags[key] = value
    return FusionConfig(name, tuple(names), **flags)


_KEY = re.compile(r"^model\.layers\.(\d+)\.(attention_adapters|output_adapters)\.adapter_fusion_layer\.([^.]+)\."
                  r"(query|key|value|dense)\.(weight|bias)$")


def load_fusion(fusion_dir: str, config: FusionConfig, members: list[BottleneckAdapter], hidden_size: int,
                num_layers: int, dtype: torch.dtype | None = None) -> FusionAdapter:
    """The fusion of `fusion_dir` over `members` (loaded bottleneck adapters, in config.adapter_names order).
    AdapterError when the members' modules and the fusion layers do not line up as AdapterHub needs them."""
    tensors, file = read_adapterhub_weights(fusion_dir, SAFETENSORS_NAME, PICKLE_NAME)
    layers: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None or m[3] != config.name:
            raise AdapterError(f"{file}: unexpected tensor {key!r} (not a layer of AdapterFusion {config.name!r})")
        layer = int(m[1])
        if layer >= num_layers:
            raise AdapterError(f"{file}: {key}: layer {layer} but the base model has {num_layers} layers")
        layers.setdefault((layer, LOCATIONS[m[2]]), {})[f"{m[4]}.{m[5]}"] = t
    positions = {p for member in members for p in member.modules}
    for member, name in zip(members, config.adapter_names):
        lacking = sorted(positions - set(member.modules))
        if lacking:     # AdapterHub skips it there, or fails when it is the last member: not served
            raise AdapterError(f"{fusion_dir}: member {name!r} has no module at {_where(lacking)} where other "
                               f"members have one; AdapterFusion members must have modules at the same places")
    fusion = FusionAdapter(fusion_dir, config, [m.math for m in members])
    for layer, position in sorted(positions):
        params = layers.get((layer, position), {})
        ctx = f"{file}: layer {layer} {position}"
        fusion.modules[(layer, position)] = FusionModule(
            [m.modules[(layer, position)] for m in members],
            _linear(params, "query", hidden_size, ctx, dtype) if config.query else None,
            _linear(params, "key", hidden_size, ctx, dtype) if config.key else None,
            _linear(params, "value", hidden_size, ctx, dtype, bias=False)[0] if config.value else None)
    if not fusion.modules:
        raise AdapterError(f"{fusion_dir}: its members have no modules")
    return fusion


def _where(positions: list[tuple[int, str]]) -> str:
    return ", ".join(f"layer {layer} {'mh_adapter' if pos == ATTENTION else 'output_adapter'}"
                     for layer, pos in positions)


def _linear(params: dict[str, torch.Tensor], name: str, hidden: int, ctx: str, dtype: torch.dtype | None,
            bias: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    w = params.get(f"{name}.weight")
    b = params.get(f"{name}.bias")
    if w is None or (bias and b is None):
        raise AdapterError(f"{ctx}: the fusion layer has no {name} weights (config {name}: true)")
    if w.shape != (hidden, hidden) or (bias and b.shape != (hidden,)):
        raise AdapterError(f"{ctx}: {name} shapes {tuple(w.shape)} / {None if b is None else tuple(b.shape)}, "
                           f"expected ({hidden}, {hidden}) / ({hidden},)")
    dtype = dtype or w.dtype
    return w.to(dtype), (b.to(dtype) if bias else None)


def reference_fusion(o: torch.Tensor, r: torch.Tensor, fusion: FusionAdapter, layer: int,
                     position: str) -> torch.Tensor:
    """The hidden state after sub-layer `position` of `layer` for tokens of one fusion, written as AdapterHub's
    compose_fuse / BertFusion.forward / post_forward compute it (float32, eval). o, r: [N, hidden]."""
    o, r = o.float(), r.float()
    module = fusion.modules.get((layer, position))
    if module is None:
        return o + r
    last = fusion.last_math
    if last.is_parallel:                                # ParallelAdapter.pre_forward
        x, query, residual = r, r, r
    else:                                               # Adapter.pre_forward, layer_norm None (Llama)
        residual = o if last.residual_before_ln else None
        x = o + r if last.original_ln_before else o
        if not last.residual_before_ln:
            residual = x
        query = x
    ups = []
    for member, math in zip(module.members, fusion.member_math):      # compose_single: its `up`
        z = x
        if member.ln_before:
            z = F.layer_norm(z, z.shape[-1:], member.ln_before[0].float(), member.ln_before[1].float(), LN_EPS)
        d = math.activation(z @ member.down_w.float().T + member.down_b.float())
        ups.append(d @ member.up_w.float().T + member.up_b.float())
    up_list = torch.stack(ups).permute(1, 0, 2)                        # [N, members, hidden]
    q = query @ module.query[0].float().T + module.query[1].float() if module.query else query
    k = up_list @ module.key[0].float().T + module.key[1].float() if module.key else up_list
    before = module.value is not None and fusion.config.value_before_softmax
    v = up_list @ module.value.float().T if before else up_list
    scores = torch.squeeze(torch.matmul(q.unsqueeze(1), k.transpose(-2, -1)), dim=1)      # [N, members]
    probs = torch.softmax(scores / 1.0, dim=-1)
    ctx = torch.squeeze(torch.matmul(probs.unsqueeze(1), v), dim=1)
    if module.value is not None and not fusion.config.value_before_softmax:
        ctx = ctx @ module.value.float().T
    h = ctx + residual
    if last.is_parallel:                                # ParallelAdapter.post_forward
        h = h + o
    return h + r if last.original_ln_after else h
