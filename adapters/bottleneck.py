"""AdapterHub bottleneck adapters (SeqBnConfig / Pfeiffer, DoubleSeqBnConfig / Houlsby, ParBnConfig / parallel):
config -> the math, checkpoint -> kernel-ready tensors, and the per-adapter torch reference.

A checkpoint is what `model.save_adapter(dir, name, with_head=False)` of `adapters` 1.x writes: an
`adapter_config.json` {"config": {...BnConfig options...}, "name": ..., "model_type": ..., "version": ...} and
`adapter.safetensors` (or `pytorch_adapter.bin`, read with `torch.load(weights_only=True)`), keys like

    model.layers.3.output_adapters.adapters.NAME.adapter_down.0.weight    [r, hidden]  down projection
    model.layers.3.output_adapters.adapters.NAME.adapter_down.0.bias      [r]
    model.layers.3.output_adapters.adapters.NAME.adapter_up.weight        [hidden, r]  up projection
    model.layers.3.output_adapters.adapters.NAME.adapter_up.bias          [hidden]
    model.layers.3.output_adapters.adapters.NAME.scaling                  [1] "learned" / [hidden] "channel"
    model.layers.3.output_adapters.adapters.NAME.adapter_norm_after.*     ln_after (adapter_norm_before.* and
                                                                          adapter_down.0 = that LayerNorm,
                                                                          adapter_down.1 = the Linear: ln_before)

`attention_adapters` sit after the attention block (mh_adapter), `output_adapters` after the MLP
(output_adapter). AdapterHub's Llama / Mistral / Qwen2 layers pass no layer norm to them, so with o the
sub-layer's output, r the residual stream entering the sub-layer and f(x) = up(act(down(x))) * scaling
(adapters/methods/modeling.py, Adapter / ParallelAdapter pre_forward / forward / post_forward):

    sequential:  x = o + r if original_ln_before else o
                 res = o if residual_before_ln else x
                 h = post(f(x), res) + (r if original_ln_after else 0)
                 post(u, res) = u + res | LN_after(u) + res | LN_after(u + res) (adapter_residual_before_ln)
    parallel:    h = o + [LN_after](f(r)) + (r if original_ln_after else 0)

which is  h = [LN_after](f(a_o o + a_r r) + e_o o + e_r r) + c_o o + c_r r  with six per-adapter coefficients
(`BnMath.coefficients`); a base token is a = e = 0, c = 1: h = o + r. The runtime (adapters/bottleneck_runtime.py)
computes that grouped by adapter; `reference_sublayer` below is the literal per-adapter version, the test oracle.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from adapters.config import CONFIG_NAME, AdapterError, read_config_json
from adapters.checkpoint import check_tensors, read_safetensors

ATTENTION = "attention"          # the sub-layer a module follows (adapters.interface's on_sublayer names)
MLP = "mlp"
LOCATIONS = {"attention_adapters": ATTENTION, "output_adapters": MLP}
SAFETENSORS_NAME = "adapter.safetensors"
PICKLE_NAME = "pytorch_adapter.bin"
LN_EPS = 1e-5                    # torch.nn.LayerNorm's default, which AdapterHub's adapter norms use


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


# AdapterHub: transformers.activations.get_activation(name.lower()), "leakyrelu" -> F.leaky_relu
ACTIVATIONS = {
    "relu": F.relu,
    "swish": F.silu,
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_new": _gelu_new,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "leakyrelu": F.leaky_relu,
    "relu6": F.relu6,
    "mish": F.mish,
    "linear": lambda x: x,
}

# BnConfig options whose set value changes the math in a way we do not serve -> why (a 400 naming the option)
UNSUPPORTED = {
    "phm_layer": "Compacter's PHM (Kronecker-factored) projections are not served",
    "inv_adapter": "invertible adapters on the embeddings are not served",
    "use_gating": "its gate averages sigmoid(W x) over the whole sequence (UniPELT), which no KV-cached server "
                  "can reproduce token by token",
}


@dataclass(frozen=True)
class BnMath:
    """The options of one bottleneck adapter that decide its math (all positions share them)."""
    is_parallel: bool = False
    original_ln_before: bool = True
    original_ln_after: bool = True
    residual_before_ln: bool = True
    adapter_residual_before_ln: bool = False
    ln_before: bool = False
    ln_after: bool = False
    non_linearity: str = "relu"

    @property
    def activation(self):
        return ACTIVATIONS[self.non_linearity]

    @property
    def coefficients(self) -> tuple[float, float, float, float, float, float]:
        """(a_o, a_r, e_o, e_r, c_o, c_r) of  h = [LN](f(a_o o + a_r r) + e_o o + e_r r) + c_o o + c_r r."""
        r_after = 1.0 if self.original_ln_after else 0.0
        if self.is_parallel:
            return 0.0, 1.0, 0.0, 0.0, 1.0, r_after
        x = (1.0, 1.0) if self.original_ln_before else (1.0, 0.0)
        res = (1.0, 0.0) if self.residual_before_ln else x
        if self.ln_after and self.adapter_residual_before_ln:      # LN_after(u + res) + [r]
            return x[0], x[1], res[0], res[1], 0.0, r_after
        return x[0], x[1], 0.0, 0.0, res[0], res[1] + r_after


@dataclass
class BnModule:
    """One adapter module (one layer, one position), scaling folded into up: f(x) = up(act(down(LN(x))))."""
    down_w: torch.Tensor                       # [r, hidden]
    down_b: torch.Tensor                       # [r]
    up_w: torch.Tensor                         # [hidden, r], times scaling (per output channel)
    up_b: torch.Tensor                         # [hidden], times scaling
    ln_before: tuple[torch.Tensor, torch.Tensor] | None = None     # (weight, bias) [hidden] each
    ln_after: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def rank(self) -> int:
        return self.down_w.shape[0]

    def tensors(self) -> list[torch.Tensor]:
        extra = [t for pair in (self.ln_before, self.ln_after) if pair for t in pair]
        return [self.down_w, self.down_b, self.up_w, self.up_b, *extra]


@dataclass
class BottleneckAdapter:
    path: str
    name: str
    math: BnMath
    modules: dict[tuple[int, str], BnModule] = field(default_factory=dict)   # (layer, ATTENTION | MLP) -> module

    @property
    def rank(self) -> int:
        return max(m.rank for m in self.modules.values())

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for m in self.modules.values() for t in m.tensors())


def parse_math(config: dict, source: str = CONFIG_NAME) -> BnMath:
    """BnMath from the "config" object of an AdapterHub adapter_config.json; AdapterError naming an option
    that we cannot serve exactly."""
    if not isinstance(config, dict):
        raise AdapterError(f"{source}: \"config\" must be a JSON object")
    arch = config.get("architecture")
    if arch not in (None, "bottleneck"):
        raise AdapterError(f"{source}: architecture {arch!r} is not a bottleneck adapter")
    for key, why in UNSUPPORTED.items():
        if config.get(key) not in (None, False):
            raise AdapterError(f"{source}: unsupported option {key}={config[key]!r}: {why}")
    rbl = config.get("residual_before_ln", True)
    if not isinstance(rbl, bool):
        raise AdapterError(f"{source}: unsupported option residual_before_ln={rbl!r}: AdapterHub 1.3 itself fails on "
                           f"it for Llama / Mistral / Qwen2 (their layers pass no layer norm to the adapter)")
    act = config.get("non_linearity", "relu")
    if not isinstance(act, str) or act.lower() not in ACTIVATIONS:
        raise AdapterError(f"{source}: unsupported option non_linearity={act!r}; served: {', '.join(ACTIVATIONS)}")
    scaling = config.get("scaling", 1.0)
    if isinstance(scaling, bool) or not (isinstance(scaling, (int, float)) or scaling in ("learned", "channel")):
        raise AdapterError(f"{source}: unsupported option scaling={scaling!r}: a number, \"learned\" or \"channel\"")
    flags = {}
    for key, default in (("is_parallel", False), ("original_ln_before", True), ("original_ln_after", True),
                         ("adapter_residual_before_ln", False), ("ln_before", False), ("ln_after", False),
                         ("mh_adapter", False), ("output_adapter", True)):
        value = config.get(key, default)
        if not isinstance(value, bool):
            raise AdapterError(f"{source}: option {key} must be true or false, got {value!r}")
        flags[key] = value
    if not flags["mh_adapter"] and not flags["output_adapter"]:
        raise AdapterError(f"{source}: mh_adapter and output_adapter are both false: the adapter has no module")
    return BnMath(is_parallel=flags["is_parallel"], original_ln_before=flags["original_ln_before"],
                  original_ln_after=flags["original_ln_after"], residual_before_ln=rbl,
                  adapter_residual_before_ln=flags["adapter_residual_before_ln"], ln_before=flags["ln_before"],
                  ln_after=flags["ln_after"], non_linearity=act.lower())


_KEY = re.compile(r"^model\.layers\.(\d+)\.(attention_adapters|output_adapters)\.adapters\.([^.]+)\.(.+)$")


def read_adapterhub_weights(adapter_dir: str, safetensors_name: str = SAFETENSORS_NAME,
                            pickle_name: str = PICKLE_NAME) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of an AdapterHub adapter directory and the file they came from: `adapter.safetensors`, else
    `pytorch_adapter.bin` through torch.load(weights_only=True) (no code runs); every tensor a finite float.
    (AdapterFusion directories name them model_adapter_fusion.safetensors / pytorch_model_adapter_fusion.bin.)"""
    st = os.path.join(adapter_dir, safetensors_name)
    if os.path.isfile(st):
        return read_safetensors(adapter_dir, safetensors_name), st
    pt = os.path.join(adapter_dir, pickle_name)
    if not os.path.isfile(pt):
        raise AdapterError(f"{adapter_dir}: no {safetensors_name} or {pickle_name}")
    try:
        tensors = torch.load(pt, map_location="cpu", weights_only=True)
    except Exception as e:          # weights_only refuses anything but tensors and plain containers
        raise AdapterError(f"{pt}: cannot read as a weights-only torch file: {type(e).__name__}: {e}") from None
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in tensors.items()):
        raise AdapterError(f"{pt}: expected a dict of name -> tensor")
    check_tensors(tensors, pt)
    return tensors, pt


def load_bottleneck(adapter_dir: str, hidden_size: int, num_layers: int,
                    dtype: torch.dtype | None = None) -> BottleneckAdapter:
    """Load an AdapterHub bottleneck adapter for a base with `hidden_size` and `num_layers`; tensors in `dtype`
    (default: the checkpoint's), scaling folded in float32. AdapterError for anything not served exactly."""
    source = os.path.join(adapter_dir, CONFIG_NAME)
    config = read_config_json(adapter_dir).get("config")
    math_ = parse_math(config, source)
    tensors, file = read_adapterhub_weights(adapter_dir)
    return bottleneck_from(adapter_dir, config, math_, tensors, file, source, hidden_size, num_layers, dtype)


def take_bottleneck_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pop the bottleneck-adapter tensors (attention_adapters / output_adapters modules) out of `tensors`: the
    bottleneck part of a union checkpoint (adapters/union.py)."""
    return {key: tensors.pop(key) for key in list(tensors) if _KEY.match(key)}


def bottleneck_from(adapter_dir: str, config: dict, math_: BnMath, tensors: dict[str, torch.Tensor], file: str,
                    source: str, hidden_size: int, num_layers: int, dtype: torch.dtype | None = None
                    ) -> BottleneckAdapter:
    """`load_bottleneck` once the config is parsed and the tensors read (`file`, `source`: for errors)."""
    groups: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    names = set()
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise AdapterError(f"{file}: unexpected tensor {key!r} (not a bottleneck adapter module)")
        layer, location, name, param = int(m[1]), LOCATIONS[m[2]], m[3], m[4]
        if layer >= num_layers:
            raise AdapterError(f"{file}: {key}: layer {layer} but the base model has {num_layers} layers")
        names.add(name)
        groups.setdefault((layer, location), {})[param] = t
    if not groups:
        raise AdapterError(f"{file}: no adapter tensors")
    if len(names) > 1:
        raise AdapterError(f"{file}: tensors of several adapters ({', '.join(sorted(names))}); expected one")
    positions = {p for _, p in groups}
    wanted = {ATTENTION} if config.get("mh_adapter") else set()
    wanted |= {MLP} if config.get("output_adapter", True) else set()
    if not positions <= wanted:
        raise AdapterError(f"{source}: the weights have {sorted(positions - wanted)} modules that mh_adapter / "
                           f"output_adapter do not declare")
    adapter = BottleneckAdapter(adapter_dir, names.pop(), math_)
    for (layer, pos), params in sorted(groups.items()):
        ctx = f"{file}: layer {layer} {pos}"
        adapter.modules[(layer, pos)] = _module(params, math_, config.get("scaling", 1.0), hidden_size, ctx, dtype)
    return adapter


def _module(params: dict[str, torch.Tensor], math_: BnMath, scaling, hidden: int, ctx: str,
            dtype: torch.dtype | None) -> BnModule:
    params = dict(params)
    linear = "adapter_down.1" if math_.ln_before else "adapter_down.0"
    expected = {f"{linear}.weight", f"{linear}.bias", "adapter_up.weight", "adapter_up.bias"}
    if math_.ln_before:
        expected |= {"adapter_down.0.weight", "adapter_down.0.bias"}
        params.pop("adapter_norm_before.weight", None)      # the same tensors as adapter_down.0 (in a .bin)
        params.pop("adapter_norm_before.bias", None)
    if math_.ln_after:
        expected |= {"adapter_norm_after.weight", "adapter_norm_after.bias"}
    if scaling in ("learned", "channel"):
        expected.add("scaling")
    missing, extra = sorted(expected - set(params)), sorted(set(params) - expected)
    if missing or extra:
        raise AdapterError(f"{ctx}: " + "; ".join(s for s in (
            f"missing {', '.join(missing)}" if missing else "", f"unexpected {', '.join(extra)}" if extra else "") if s))
    down_w, down_b = params[f"{linear}.weight"].float(), params[f"{linear}.bias"].float()
    up_w, up_b = params["adapter_up.weight"].float(), params["adapter_up.bias"].float()
    r = down_w.shape[0] if down_w.dim() == 2 else -1
    shapes_ok = (down_w.dim() == 2 and down_w.shape[1] == hidden and down_b.shape == (r,)
                 and up_w.shape == (hidden, r) and up_b.shape == (hidden,))
    if not shapes_ok:
        raise AdapterError(f"{ctx}: shapes down {tuple(down_w.shape)} / {tuple(down_b.shape)}, up "
                           f"{tuple(up_w.shape)} / {tuple(up_b.shape)} do not fit hidden_size {hidden}")
    if scaling in ("learned", "channel"):
        s = params["scaling"].float().reshape(-1)
        want = 1 if scaling == "learned" else hidden
        if s.numel() != want:
            raise AdapterError(f"{ctx}: scaling has {s.numel()} values; {scaling!r} scaling has {want}")
    else:
        s = torch.tensor([float(scaling)])
    up_w, up_b = up_w * s[:, None], up_b * s

    def norm(prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
        w, b = params[f"{prefix}.weight"].float(), params[f"{prefix}.bias"].float()
        if w.shape != (hidden,) or b.shape != (hidden,):
            raise AdapterError(f"{ctx}: {prefix} shapes {tuple(w.shape)} / {tuple(b.shape)}, expected ({hidden},)")
        return w, b
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t.to(params["adapter_up.weight"].dtype))
    ln_b = tuple(map(cast, norm("adapter_down.0"))) if math_.ln_before else None
    ln_a = tuple(map(cast, norm("adapter_norm_after"))) if math_.ln_after else None
    return BnModule(cast(down_w), cast(down_b), cast(up_w), cast(up_b), ln_b, ln_a)


def reference_sublayer(o: torch.Tensor, r: torch.Tensor, adapter: BottleneckAdapter | None, layer: int,
                       position: str) -> torch.Tensor:
    """The hidden state after sub-layer `position` of `layer` for tokens of one adapter (None: the base model),
    written as AdapterHub's pre_forward / forward / post_forward compute it (float32). o, r: [N, hidden]."""
    o, r = o.float(), r.float()
    module = adapter.modules.get((layer, position)) if adapter is not None else None
    if module is None:
        return o + r
    m = adapter.math

    def f(x):
        if module.ln_before:
            x = F.layer_norm(x, x.shape[-1:], module.ln_before[0].float(), module.ln_before[1].float(), LN_EPS)
        d = m.activation(x @ module.down_w.float().T + module.down_b.float())
        return d @ module.up_w.float().T + module.up_b.float()

    def ln_after(u):
        return F.layer_norm(u, u.shape[-1:], module.ln_after[0].float(), module.ln_after[1].float(), LN_EPS)

    if m.is_parallel:
        up = f(r)
        if module.ln_after:
            up = ln_after(up)
        h = up + o
    else:
        residual = o if m.residual_before_ln else None
        x = o + r if m.original_ln_before else o
        if not m.residual_before_ln:
            residual = x
        h = f(x)
        if m.adapter_residual_before_ln:
            h = h + residual
        if module.ln_after:
            h = ln_after(h)
        if not m.adapter_residual_before_ln:
            h = h + residual
    return h + r if m.original_ln_after else h
