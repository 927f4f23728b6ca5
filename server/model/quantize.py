"""4-bit NF4 bases: which layers, quantizing a loaded model, and reading transformers + bitsandbytes checkpoints.

What transformers + bitsandbytes quantize, and so do we: every nn.Linear of the decoder layers (q/k/v/o,
gate/up/down). What stays in the compute dtype: the embeddings, the norms and lm_head (transformers'
`get_keys_to_not_convert`: the output embedding and tied weights). Llama / Mistral / Qwen2 declare no
`_keep_in_fp32_modules`. A pre-quantized checkpoint decides for itself: a module saved with a bitsandbytes
quant state is 4-bit (e.g. lm_head, when it was quantized with an `llm_int8_skip_modules` list that left it out),
any other is full precision.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from kernels.nf4 import DequantScratch, NF4Linear
from kernels.nf4_format import STATE_SUFFIXES, from_state_dict, quantize_nf4
from server.model.llama import LlamaModel, Linear

QUANTIZE = ("nf4",)

# "model.layers.0.self_attn.q_proj.weight.absmax" -> ("model.layers.0.self_attn.q_proj", "absmax")
_STATE_KEY = re.compile(r"^(.+)\.weight\.(" + "|".join(re.escape(s) for s in STATE_SUFFIXES) + r")$")


def check_quantization_config(qcfg: dict | None, model_dir: str) -> bool:
    """config.json's `quantization_config` -> whether the checkpoint is pre-quantized to NF4 (raise if it is
    quantized some other way)."""
    if not qcfg:
        return False
    method = qcfg.get("quant_method")
    if method != "bitsandbytes" or not qcfg.get("load_in_4bit") or qcfg.get("bnb_4bit_quant_type") != "nf4":
        raise ValueError(f"{model_dir}: quantization_config {method!r} (4-bit: {qcfg.get('load_in_4bit')}, "
                         f"type {qcfg.get('bnb_4bit_quant_type')!r}) is not supported; only bitsandbytes NF4 "
                         "checkpoints load pre-quantized")
    return True


def placeholder(n: int, k: int, dtype: torch.dtype, device) -> nn.Parameter:
    """A [n, k] weight with no memory (zero strides): what `Linear.weight` is when `Linear.quantized` holds W."""
    return nn.Parameter(torch.zeros((), dtype=dtype, device=device).expand(n, k), requires_grad=False)


def install(linear: Linear, op: NF4Linear, device) -> None:
    """Make `linear` 4-bit: its parts move to `device`, its full-precision weight is dropped."""
    linear.quantized = op.to(device)
    linear.weight = placeholder(*op.shape, op.dtype, device)


def quantizable(model: LlamaModel) -> list[Linear]:
    """The linears transformers + bitsandbytes quantize by default: all of the decoder layers', not lm_head."""
    return [m for layer in model.layers for m in layer.modules() if isinstance(m, Linear)]


def quantize_model(model: LlamaModel, double_quant: bool, device) -> int:
    """Quantize every decoder linear of a loaded model (in its compute dtype) to NF4, each HF module on its own as
    transformers does (q, k and v have their own blocks and double-quant offsets). Returns the weight bytes saved."""
    scratch, saved = DequantScratch(), 0
    for linear in quantizable(model):
        w = linear.weight.data
        parts = [quantize_nf4(w[col:col + width], double_quant) for col, width in linear.slices.values()]
        op = NF4Linear(parts, scratch)
        saved += w.numel() * w.element_size() - op.nbytes
        install(linear, op, device)
    return saved


class PrequantizedWeights:
    """Collects a checkpoint's bitsandbytes tensors while the loader reads it, then builds the NF4 linears.

    A 4-bit module's tensors: its packed `.weight` (uint8) and `.weight.<absmax|quant_map|nested_absmax|
    nested_quant_map|quant_state.bitsandbytes__nf4>`; grouped here by module name."""

    def __init__(self):
        self.modules: dict[str, dict[str, torch.Tensor]] = {}

    def take(self, name: str, tensor: torch.Tensor) -> bool:
        """Keep `name` if it is part of a 4-bit weight; False for an ordinary tensor."""
        m = _STATE_KEY.match(name)
        if m:
            self.modules.setdefault(m[1], {})[m[2]] = tensor
            return True
        if name.endswith(".weight") and tensor.dtype == torch.uint8:
            self.modules.setdefault(name.removesuffix(".weight"), {})[""] = tensor
            return True
        return False

    def install(self, model: LlamaModel, target, dtype: torch.dtype, device) -> set[str]:
        """Build and install the NF4 linears; `target(name)` maps an HF tensor name to (our parameter, rows) as the
        loader does. Returns our parameter names now filled."""
        scratch = DequantScratch()
        by_param: dict[str, list[tuple[int, object]]] = {}
        for module, tensors in self.modules.items():
            param, rows = target(module + ".weight")
            if param is None or not param.endswith(".weight"):
                raise ValueError(f"{module}: 4-bit weights for a module we do not quantize")
            w = from_state_dict(module + ".weight", tensors, dtype)
            first, width = rows if rows is not None else (0, w.shape[0])
            by_param.setdefault(param, []).append((first, w))
        params = dict(model.named_parameters())
        for param, parts in by_param.items():
            linear: Linear = model.get_submodule(param.removesuffix(".weight"))
            parts.sort(key=lambda p: p[0])
            expected = [(col, width) for col, width in linear.slices.values()]
            got = [(first, w.shape[0]) for first, w in parts]
            if got != expected or any(w.shape[1] != params[param].shape[1] for _, w in parts):
                raise ValueError(f"{param}: 4-bit parts cover rows {got} x {[w.shape[1] for _, w in parts]}, want "
                                 f"{expected} x {params[param].shape[1]} (every sub-module of a fused layer "
                                 "quantized, with the model's shapes)")
            install(linear, NF4Linear([w for _, w in parts], scratch), device)
        return set(by_param)


def weight_bytes(model: LlamaModel) -> int:
    """Bytes of the model's weights as stored: 4-bit layers count their packed data and scales, tied weights once."""
    seen, total = set(), 0
    for module in model.modules():
        if isinstance(module, Linear) and module.quantized is not None:
            total += module.quantized.nbytes
    for p in model.parameters():
        if p.stride() and 0 in p.stride():
            continue                                   # a 4-bit layer's placeholder
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total
