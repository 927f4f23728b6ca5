"""PEFT LoRA-family checkpoints (LoRA, rsLoRA, DoRA, AdaLoRA; any linear, lm_head, embed_tokens) -> the tensors
the SGMV kernels consume, with every constant folded in at load.

A key, worked: "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    "base_model.model."                PeftModel.base_model (LoraModel) . model (the HF model)
    "model.layers.0.self_attn.q_proj"  HF module path: what target_modules / rank_pattern / alpha_pattern match
                                       -> (layer 0, "q_proj"); our model fuses q/k/v, hence HF names as keys
    "lora_A.weight"                    the tensor (PEFT drops the adapter name "default" when saving)
Tensors per module: lora_A.weight [r, in], lora_B.weight [out, r], lora_magnitude_vector [out] (DoRA);
embed_tokens: lora_embedding_A [r, vocab], lora_embedding_B [hidden, r]; AdaLoRA: lora_A [r, in],
lora_E [r, 1], lora_B [out, r] (no ".weight"); base_layer.weight: a copy of the base embed/lm_head that
PEFT adds when embeddings are targeted, accepted only if it equals the base.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Callable

import torch

from adapters.checkpoint import WEIGHTS_NAME, read_safetensors
from adapters.config import BASE_MODIFYING_INITS, UNSUPPORTED_LORA_OPTIONS, AdapterError, LoraConfig, load_config
from adapters.model_spec import ModelSpec

PREFIX = "base_model.model."
# Longest first: "lora_A.weight" must win over "lora_A", "base_layer.weight" over "weight".
PARAMS = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector", "lora_embedding_A", "lora_embedding_B",
          "base_layer.weight", "lora_A", "lora_B", "lora_E", "weight")
BLOCKS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
_LAYER_MODULE = re.compile(r"^model\.layers\.(\d+)\.(\w+)\.(\w+)$")
ADALORA_EPS = 1e-5   # PEFT divides by (ranknum + 1e-5)

BaseWeight = Callable[[int | None, str], torch.Tensor]


# Layout (what kernels/ stacks per slot, PEFT's own orientation): y = x @ W.T (+ b) becomes
#   y = g * (x @ W.T) + (x @ lora_a.T) @ lora_b.T (+ b)       g = dora_scale, or 1 without DoRA
# lora_a [r, in], lora_b [out, r] with alpha/r (or alpha/sqrt(r)), rank/alpha patterns, AdaLoRA's E and
# scaling/ranknum, and DoRA's g all folded in; ranks that are all zero in A or B are dropped.
@dataclass
class LoraModule:
    lora_a: torch.Tensor                      # [r, in]
    lora_b: torch.Tensor                      # [out, r], every constant folded in
    dora_scale: torch.Tensor | None = None    # [out] DoRA g = magnitude / ||W + scaling * B @ A|| per row

    @property
    def num_bytes(self) -> int:
        return sum(_nbytes(t) for t in (self.lora_a, self.lora_b, self.dora_scale))


@dataclass
class LoraEmbedding:
    """LoRA on embed_tokens: h[t] = g * E[id_t] + lora_a[id_t] @ lora_b.T  (g = dora_scale, or 1)."""
    lora_a: torch.Tensor                      # [vocab, r]: rows gathered by token id (PEFT lora_embedding_A.T)
    lora_b: torch.Tensor                      # [hidden, r], scaling (and DoRA g) folded in
    dora_scale: torch.Tensor | None = None    # [hidden] DoRA only

    @property
    def num_bytes(self) -> int:
        return sum(_nbytes(t) for t in (self.lora_a, self.lora_b, self.dora_scale))


@dataclass
class LoraAdapter:
    path: str
    config: LoraConfig
    modules: dict[tuple[int, str], LoraModule] = field(default_factory=dict)   # (layer, "q_proj") -> ...
    lm_head: LoraModule | None = None
    embed: LoraEmbedding | None = None

    def parts(self) -> list[LoraModule | LoraEmbedding]:
        return [*self.modules.values(), *(p for p in (self.lm_head, self.embed) if p is not None)]

    @property
    def rank(self) -> int:
        return max((p.lora_a.shape[0] if isinstance(p, LoraModule) else p.lora_a.shape[1]
                    for p in self.parts()), default=0)

    @property
    def num_bytes(self) -> int:
        return sum(p.num_bytes for p in self.parts())


def load_lora(path: str, spec: ModelSpec, base_weight: BaseWeight, dtype: torch.dtype | None = None) -> LoraAdapter:
    """Load the PEFT LoRA / DoRA / AdaLoRA adapter in directory `path` for a base model described by `spec`.

    base_weight(layer, module) -> the frozen base weight [out, in] of HF module `module` ("q_proj", ...; layer
    None for "lm_head" / "embed_tokens"); read for DoRA's norms and to check saved embedding copies. With tied
    embeddings "lm_head" is asked for as "embed_tokens". `dtype`: of the returned tensors (default: the
    checkpoint's); folding is done in float32. Raises AdapterError for anything we cannot serve exactly.
    """
    config = load_config(path)
    if not isinstance(config, LoraConfig):
        raise AdapterError(f"{path}: peft_type {config.peft_type!r} is not a LoRA adapter")
    _check_supported(config, path)
    file = os.path.join(path, WEIGHTS_NAME)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in read_safetensors(path).items():
        module, param = _split_key(key, file)
        groups.setdefault(module, {})[param] = tensor
    if not any(p.startswith("lora_") for params in groups.values() for p in params):
        raise AdapterError(f"{file}: no LoRA weights (lora_A / lora_B) found")

    adapter = LoraAdapter(path, config)
    for module_path in sorted(groups, key=_sort_key):
        params = groups[module_path]
        layer, name = _locate(module_path, spec, file)
        ctx = f"{file}: {module_path}"
        base = _base_getter(base_weight, spec, layer, name)
        for copy_name in ("base_layer.weight", "weight"):
            if copy_name in params:
                _check_base_copy(params.pop(copy_name), base(), ctx)
        if not params:
            continue
        if not config.targets(module_path):
            raise AdapterError(f"{ctx}: has LoRA weights but adapter_config.json does not target this module "
                               f"(target_modules={config.target_modules!r}, "
                               f"layers_to_transform={config.layers_to_transform!r})")
        shape = _base_shape(spec, name)
        out_dtype = dtype or next(iter(params.values())).dtype
        if name == "embed_tokens":
            adapter.embed = _embedding(params, config, module_path, shape, base, ctx, out_dtype)
            continue
        part = _linear(params, config, module_path, shape, base, ctx, out_dtype)
        if part is None:
            continue
        if name == "lm_head":
            adapter.lm_head = part
        else:
            adapter.modules[(layer, name)] = part
    return adapter


def _check_supported(config: LoraConfig, path: str) -> None:
    source = os.path.join(path, "adapter_config.json")
    for option, value in config.unsupported.items():
        raise AdapterError(f"{source}: {option}={value!r} is not supported: {option} "
                           f"{UNSUPPORTED_LORA_OPTIONS[option]}")
    if config.bias != "none":
        raise AdapterError(f"{source}: bias={config.bias!r} is not supported (it trains the base model's biases)")
    init = config.init_lora_weights
    if isinstance(init, str) and init.lower().startswith(BASE_MODIFYING_INITS):
        raise AdapterError(f"{source}: init_lora_weights={init!r} rewrote the base weights at initialisation; "
                           f"convert the adapter with save_pretrained(path_initial_model_for_weight_conversion=...)")


def _split_key(key: str, file: str) -> tuple[str, str]:
    """"base_model.model.model.layers.0.mlp.up_proj.lora_B.weight" -> ("model.layers.0.mlp.up_proj",
    "lora_B.weight")."""
    if key.startswith(PREFIX):
        rest = key[len(PREFIX):]
        param = next((p for p in PARAMS if rest.endswith("." + p)), None)
        module = rest[:-len(param) - 1] if param else ""
        if param and ".lora_" not in module and ".modules_to_save" not in module:
            return module, param
    hint = ""
    if key.endswith("lora_B.bias"):
        hint = " (a lora_B bias: lora_bias=True is not supported)"
    elif ".modules_to_save." in key:
        hint = " (modules_to_save replaces whole base modules: not supported)"
    elif key.endswith(".bias"):
        hint = " (a trained base bias: not supported)"
    raise AdapterError(f"{file}: unexpected key {key!r}{hint}")


def _locate(module_path: str, spec: ModelSpec, file: str) -> tuple[int | None, str]:
    """"model.layers.3.mlp.down_proj" -> (3, "down_proj"); "lm_head" / "model.embed_tokens" -> (None, name)."""
    if module_path == "lm_head":
        return None, "lm_head"
    if module_path == "model.embed_tokens":
        return None, "embed_tokens"
    m = _LAYER_MODULE.match(module_path)
    if m is None or BLOCKS.get(m[3]) != m[2]:
        raise AdapterError(f"{file}: names module {module_path!r}, which the {spec.model_type} base model does not "
                           f"have (LoRA can target {', '.join(BLOCKS)}, lm_head and embed_tokens)")
    layer = int(m[1])
    if layer >= spec.num_layers:
        raise AdapterError(f"{file}: names layer {layer} ({module_path}) but the base model has "
                           f"{spec.num_layers} layers")
    return layer, m[3]


def _sort_key(module_path: str):
    m = _LAYER_MODULE.match(module_path)
    return (int(m[1]), module_path) if m else (-1, module_path)


def _base_shape(spec: ModelSpec, name: str) -> tuple[int, int]:
    """[out, in] of HF module `name` (embed_tokens: [vocab, hidden], the nn.Embedding weight)."""
    h, i = spec.hidden_size, spec.intermediate_size
    return {"q_proj": (spec.q_size, h), "k_proj": (spec.kv_size, h), "v_proj": (spec.kv_size, h),
            "o_proj": (h, spec.q_size), "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i),
            "lm_head": (spec.vocab_size, h), "embed_tokens": (spec.vocab_size, h)}[name]


def _base_getter(base_weight: BaseWeight, spec: ModelSpec, layer: int | None, name: str):
    if name == "lm_head" and spec.tie_word_embeddings:
        name = "embed_tokens"
    return lambda: base_weight(layer, name).detach().to("cpu")


def _check_base_copy(saved: torch.Tensor, base: torch.Tensor, ctx: str) -> None:
    if tuple(saved.shape) != tuple(base.shape):
        raise AdapterError(f"{ctx}: carries a full base weight of shape {tuple(saved.shape)} but the base model's "
                           f"is {tuple(base.shape)} (resized vocabulary?): not supported")
    coarse = saved.dtype if torch.finfo(saved.dtype).eps >= torch.finfo(base.dtype).eps else base.dtype
    if not torch.equal(saved.to(coarse), base.to(coarse)):
        raise AdapterError(f"{ctx}: carries a full base weight that differs from the base model's (trained or "
                           f"resized embeddings): replacing base weights is not supported")


def _expect(params: dict, required: set[str], ctx: str) -> None:
    missing, extra = required - params.keys(), params.keys() - required
    if extra:
        raise AdapterError(f"{ctx}: unexpected tensor(s) {sorted(extra)} (expected {sorted(required)})")
    if missing:
        raise AdapterError(f"{ctx}: incomplete: has {sorted(params)} but no {sorted(missing)}")


def _check_2d(t: torch.Tensor, what: str, ctx: str) -> None:
    if t.dim() != 2:
        raise AdapterError(f"{ctx}: {what} must be 2-D, got shape {tuple(t.shape)}")


def _scaling(config: LoraConfig, module_path: str, rank: int, ctx: str) -> float:
    """PEFT LoRA: alpha / r, or alpha / sqrt(r) with use_rslora; r and alpha from rank/alpha_pattern."""
    expected = config.rank_for(module_path)
    if rank != expected:
        raise AdapterError(f"{ctx}: rank mismatch: the tensors have r={rank} but adapter_config.json gives "
                           f"r={expected} (r / rank_pattern)")
    if rank <= 0:
        raise AdapterError(f"{ctx}: LoRA rank must be positive, got {rank}")
    alpha = config.alpha_for(module_path)
    return alpha / math.sqrt(rank) if config.use_rslora else alpha / rank


def _linear(params, config, module_path, shape, base, ctx, out_dtype) -> LoraModule | None:
    out_f, in_f = shape
    if config.is_adalora:
        _expect(params, {"lora_A", "lora_E", "lora_B"}, ctx)
        a, b = params["lora_A"], params["lora_B"]
    else:
        _expect(params, {"lora_A.weight", "lora_B.weight"} | ({"lora_magnitude_vector"} if config.use_dora else set()),
                ctx)
        a, b = params["lora_A.weight"], params["lora_B.weight"]
    _check_2d(a, "lora_A", ctx)
    _check_2d(b, "lora_B", ctx)
    if a.shape[1] != in_f:
        raise AdapterError(f"{ctx}: shape mismatch: lora_A {tuple(a.shape)} has {a.shape[1]} input features, "
                           f"the base module has {in_f}")
    if b.shape[0] != out_f:
        raise AdapterError(f"{ctx}: shape mismatch: lora_B {tuple(b.shape)} has {b.shape[0]} output features, "
                           f"the base module has {out_f}")
    if a.shape[0] != b.shape[1]:
        raise AdapterError(f"{ctx}: rank mismatch: lora_A has r={a.shape[0]} rows, lora_B has r={b.shape[1]} "
                           f"columns")
    rank = a.shape[0]
    a32, b32 = a.float(), b.float()
    if config.is_adalora:
        a32, factor = _adalora_fold(a32, params["lora_E"], config, module_path, rank, ctx)
    else:
        factor = _scaling(config, module_path, rank, ctx)
    b32 = b32 * factor
    g = None
    if config.use_dora:
        g = _dora_scale(params["lora_magnitude_vector"], base().float(), a32, b32, shape, ctx)
        b32 = b32 * g[:, None]
    keep = (a32 != 0).any(dim=1) & (b32 != 0).any(dim=0)
    a32, b32 = a32[keep], b32[:, keep]
    if a32.shape[0] == 0 and g is None:
        return None
    return LoraModule(a32.to(out_dtype).contiguous(), b32.to(out_dtype).contiguous(),
                      None if g is None else g.to(out_dtype))


def _adalora_fold(a32, e, config, module_path, rank, ctx) -> tuple[torch.Tensor, float]:
    """AdaLoRA: delta = B @ (A * E) * scaling / (ranknum + 1e-5), scaling = lora_alpha (or r if alpha <= 0).

    The saved tensors keep only the ranks rank_pattern marks True. On load PEFT builds each module with init_r
    ranks, resizes it to the kept ones and copies back the old ranknum, so ranknum = init_r, not the kept r.
    """
    if tuple(e.shape) != (rank, 1):
        raise AdapterError(f"{ctx}: lora_E has shape {tuple(e.shape)}, expected ({rank}, 1)")
    expected = config.rank_for(module_path)
    if rank != expected:
        raise AdapterError(f"{ctx}: rank mismatch: the tensors have r={rank} but adapter_config.json gives "
                           f"r={expected} (init_r / rank_pattern)")
    scaling = config.lora_alpha if config.lora_alpha > 0 else float(rank)
    return a32 * e.float(), scaling / (config.init_r + ADALORA_EPS)


def _dora_scale(magnitude, w, a32, b32, shape, ctx) -> torch.Tensor:
    """g = magnitude / ||W + scaling * B @ A|| over each output row (PEFT's weight norm, bias excluded)."""
    if tuple(magnitude.shape) != (shape[0],):
        raise AdapterError(f"{ctx}: lora_magnitude_vector has shape {tuple(magnitude.shape)}, expected "
                           f"({shape[0]},)")
    if tuple(w.shape) != tuple(shape):
        raise AdapterError(f"{ctx}: base weight has shape {tuple(w.shape)}, expected {tuple(shape)}")
    norm = torch.linalg.norm(w + b32 @ a32, dim=1)
    if not (norm > 0).all():
        raise AdapterError(f"{ctx}: DoRA weight norm is zero for {int((norm == 0).sum())} output feature(s)")
    return magnitude.float() / norm


def _embedding(params, config, module_path, shape, base, ctx, out_dtype) -> LoraEmbedding | None:
    vocab, hidden = shape
    if config.is_adalora:
        raise AdapterError(f"{ctx}: AdaLoRA on embed_tokens is not supported")
    _expect(params, {"lora_embedding_A", "lora_embedding_B"} | ({"lora_magnitude_vector"} if config.use_dora
                                                                else set()), ctx)
    a, b = params["lora_embedding_A"], params["lora_embedding_B"]
    _check_2d(a, "lora_embedding_A", ctx)
    _check_2d(b, "lora_embedding_B", ctx)
    if a.shape[1] != vocab:
        raise AdapterError(f"{ctx}: shape mismatch: lora_embedding_A {tuple(a.shape)} covers {a.shape[1]} tokens, "
                           f"the base vocabulary has {vocab}")
    if b.shape[0] != hidden:
        raise AdapterError(f"{ctx}: shape mismatch: lora_embedding_B {tuple(b.shape)} has {b.shape[0]} features, "
                           f"the base hidden size is {hidden}")
    if a.shape[0] != b.shape[1]:
        raise AdapterError(f"{ctx}: rank mismatch: lora_embedding_A has r={a.shape[0]} rows, lora_embedding_B has "
                           f"r={b.shape[1]} columns")
    a32 = a.float().T                                                # [vocab, r]
    b32 = b.float() * _scaling(config, module_path, a.shape[0], ctx)  # [hidden, r]
    g = None
    if config.use_dora:
        # PEFT's DoraEmbeddingLayer takes the norm of W.T [hidden, vocab]: one factor per hidden feature.
        g = _dora_scale(params["lora_magnitude_vector"], base().float().T, a32.T, b32, (hidden, vocab), ctx)
        b32 = b32 * g[:, None]
    keep = (a32 != 0).any(dim=0) & (b32 != 0).any(dim=0)
    a32, b32 = a32[:, keep], b32[:, keep]
    if a32.shape[1] == 0 and g is None:
        return None
    return LoraEmbedding(a32.to(out_dtype).contiguous(), b32.to(out_dtype).contiguous(),
                         None if g is None else g.to(out_dtype))


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()
