"""AdapterHub prefix tuning (`PrefixTuningConfig`, architecture "prefix_tuning"): checkpoint -> every layer's
prefix keys / values, handed to the engine as `PrefixKV` like PEFT's (adapters/prefix_runtime.py).

`save_adapter` writes the prefix *generator* of the library's `PrefixTuningPool` (adapters/methods/
prefix_tuning.py), once under the pool and once more under every layer that references it (the same tensors in
a `pytorch_adapter.bin`):

    model.prefix_tuning.prefix_tunings.NAME.self_prefix.wte.weight                          [n, hidden]
    model.prefix_tuning.prefix_tunings.NAME.self_prefix.control_trans.0.weight / .bias      [b, hidden] / [b]
    model.prefix_tuning.prefix_tunings.NAME.self_prefix.control_trans.2.weight / .bias      [L*2*kvh*d, b] / [..]
    model.layers.3.self_attn.prefix_tuning.pool.prefix_tunings.NAME.self_prefix.<the same>
    (flat=True: model.prefix_tuning.prefix_tunings.NAME.self_prefix.control_trans           [n*L*2*kvh*d])

The eval forward (`PrefixTuning.forward`, dropout off) is, with n = prefix_length, L = layers:

    kv = control_trans.2(act(control_trans.0(wte.weight)))        (flat: kv = control_trans)
    kv.view(n, 2 * L, kvh, d): layer l's keys are [:, 2l], its values [:, 2l + 1]

computed once here at load. AdapterHub's Llama / Mistral / Qwen2 attention concatenates them, with no RoPE,
in front of the keys / values of the request's tokens, which keep positions 0, 1, ...; every query attends every
prefix key. So the K/V go to the shared prefix blocks as they are, with `first_position=0`.

Options: `dropout` is training-only; `encoder_prefix` / `cross_prefix` choose encoder / cross-attention prefixes of
encoder-decoder models (a decoder-only model's "self_prefix" ignores both); `use_gating` (UniPELT's gate, which
averages over the whole sequence) and `leave_out` (layers without a prefix) are refused by name.
"""
from __future__ import annotations

import os
import re

import torch
import torch.nn.functional as F

from adapters.bottleneck import ACTIVATIONS, read_adapterhub_weights
from adapters.config import ADAPTERHUB_PREFIX, CONFIG_NAME, AdapterError, read_config_json
from adapters.interface import AdapterRuntime, PrefixKV

# the pool's generator, or a layer's reference to it: (adapter name, location, parameter)
_POOL = re.compile(r"^model\.prefix_tuning\.prefix_tunings\.([^.]+)\.([^.]+)\.(.+)$")
_COPY = re.compile(r"^model\.layers\.\d+\.self_attn\.prefix_tuning\.pool\.prefix_tunings\.([^.]+)\.([^.]+)\.(.+)$")


def parse_prefix_config(config: dict, source: str) -> tuple[int, bool, str]:
    """(prefix_length, flat, non_linearity) of a PrefixTuningConfig; AdapterError naming an unserved option."""
    if config.get("use_gating"):
        raise AdapterError(f"{source}: unsupported option use_gating={config['use_gating']!r}: a gated prefix "
                           f"(UniPELT) averages its gate over the whole sequence, which a KV-cached server cannot "
                           f"reproduce token by token")
    if config.get("leave_out"):
        raise AdapterError(f"{source}: unsupported option leave_out={config['leave_out']!r}: the prefix is served "
                           f"in every layer (AdapterDrop, adapter_drop=k, leaves out layers below k)")
    n = config.get("prefix_length", 30)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise AdapterError(f"{source}: prefix_length must be a positive integer, got {n!r}")
    flat = config.get("flat", False)
    if not isinstance(flat, bool):
        raise AdapterError(f"{source}: option flat must be true or false, got {flat!r}")
    act = config.get("non_linearity", "tanh")
    if not flat and (not isinstance(act, str) or act.lower() not in ACTIVATIONS):
        raise AdapterError(f"{source}: unsupported option non_linearity={act!r}; served: {', '.join(ACTIVATIONS)}")
    return n, flat, str(act).lower()


def take_prefix_tensors(tensors: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """Pop every prefix-tuning tensor out of `tensors`; return the generator's parameters (parameter -> tensor),
    checking that the layers' copies equal the pool's."""
    found: dict[str, list[torch.Tensor]] = {}
    locations, names = set(), set()
    for key in list(tensors):
        m = _POOL.match(key) or _COPY.match(key)
        if m is not None:
            names.add(m[1])
            locations.add(m[2])
            found.setdefault(m[3], []).append(tensors.pop(key))
    if len(names) > 1:
        raise AdapterError(f"{where}: prefix tensors of several adapters ({', '.join(sorted(names))}); expected one")
    if len(locations) > 1:
        raise AdapterError(f"{where}: prefixes at {', '.join(sorted(locations))}; a decoder-only model has one "
                           f"(self-attention)")
    for param, copies in found.items():
        if any(not torch.equal(t, copies[0]) for t in copies[1:]):
            raise AdapterError(f"{where}: the copies of the prefix generator's {param} differ")
    if not found:
        raise AdapterError(f"{where}: no prefix-tuning tensors")
    return {param: copies[0] for param, copies in found.items()}


def prefix_kv(params: dict[str, torch.Tensor], n: int, flat: bool, activation: str, spec, where: str) -> PrefixKV:
    """The eval forward of AdapterHub's (Flat)PrefixTuning: every layer's keys and values, float32."""
    layers, kvh = spec.num_layers, spec.num_kv_heads
    head_dim = spec.hidden_size // spec.num_heads          # AdapterHub's n_embd_per_head (no d_kv on these models)
    if head_dim != spec.head_dim:
        raise AdapterError(f"{where}: AdapterHub sizes prefix heads hidden_size / num_attention_heads = {head_dim}, "
                           f"but the base model's heads are {spec.head_dim} wide")
    width = layers * 2 * kvh * head_dim
    expected = {"control_trans"} if flat else {"wte.weight", "control_trans.0.weight", "control_trans.0.bias",
                                               "control_trans.2.weight", "control_trans.2.bias"}
    missing, extra = sorted(expected - set(params)), sorted(set(params) - expected)
    if missing or extra:
        found = [f"missing {', '.join(missing)}" if missing else "", f"unexpected {', '.join(extra)}" if extra else ""]
        raise AdapterError(f"{where}: prefix generator (flat={flat}): " + "; ".join(s for s in found if s))
    p = {k: v.float() for k, v in params.items()}
    if flat:
        kv = p["control_trans"]
        if kv.shape != (n * width,):
            raise AdapterError(f"{where}: control_trans has shape {list(kv.shape)}, expected [{n * width}] "
                               f"(prefix_length {n} x {layers} layers x 2 x {kvh} heads x {head_dim})")
    else:
        wte, w0, b0, w2, b2 = (p[k] for k in ("wte.weight", "control_trans.0.weight", "control_trans.0.bias",
                                              "control_trans.2.weight", "control_trans.2.bias"))
        b = w0.shape[0] if w0.dim() == 2 else -1
        if wte.shape != (n, spec.hidden_size) or w0.shape != (b, spec.hidden_size) or b0.shape != (b,) \
                or w2.shape != (width, b) or b2.shape != (width,):
            raise AdapterError(f"{where}: prefix generator shapes wte {list(wte.shape)}, control_trans.0 "
                               f"{list(w0.shape)}, control_trans.2 {list(w2.shape)} do not fit prefix_length {n}, "
                               f"hidden_size {spec.hidden_size} and {layers} layers x 2 x {kvh} heads x {head_dim}")
        kv = F.linear(ACTIVATIONS[activation](F.linear(wte, w0, b0)), w2, b2)
    kv = kv.reshape(n, layers, 2, kvh, head_dim).permute(2, 1, 0, 3, 4)       # [2, L, n, kvh, d]
    return PrefixKV(key=kv[0].contiguous(), value=kv[1].contiguous(), first_position=0)


class AdapterHubPrefixRuntime(AdapterRuntime):
    """Serves AdapterHub prefix tuning, alone or as the prefix part of a union (MAM). Nothing acts per step: the
    prefix is in each request's block table (server/prefix_store.py)."""
    name = "adapterhub_prefix"
    kinds = (ADAPTERHUB_PREFIX,)
    evictable = False           # as PrefixRuntime: a request binds to its adapter's KV blocks when it is added

    def __init__(self, model):
        self.spec = model.spec

    def load(self, path: str) -> PrefixKV:
        source = os.path.join(path, CONFIG_NAME)
        tensors, file = read_adapterhub_weights(path)
        kv = self.load_part(path, read_config_json(path).get("config"), tensors, source)
        if tensors:
            raise AdapterError(f"{file}: unexpected tensor(s) {', '.join(sorted(tensors))} in a prefix-tuning "
                               f"checkpoint")
        return kv

    def load_part(self, path: str, config: dict, tensors: dict[str, torch.Tensor],
                  source: str | None = None) -> PrefixKV:
        n, flat, activation = parse_prefix_config(config, source or os.path.join(path, CONFIG_NAME))
        return prefix_kv(take_prefix_tensors(tensors, path), n, flat, activation, self.spec, path)

    def virtual_kv(self, weights: PrefixKV) -> PrefixKV:
        return weights
