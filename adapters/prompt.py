"""PEFT prompt-learning checkpoints (prefix tuning / P-tuning v2, prompt tuning, P-tuning v1) -> the virtual
tokens the engine turns into shared KV blocks (adapters/prefix_runtime.py, server/prefix_store.py).

PEFT saves every one of these kinds as one tensor, `prompt_embeddings`, the prompt encoder's output computed at
save time (so prefix_projection's MLP, P-tuning's MLP/LSTM and the TEXT / RANDOM init are already applied):
    PREFIX_TUNING  [n, num_layers * 2 * token_dim]   token_dim = num_kv_heads * head_dim (PEFT >= 0.12 sizes the
                   prefix by the KV heads for GQA); per virtual token, layer-major: layer l's key is columns
                   (2l) * token_dim ..., its value (2l + 1) * token_dim ..., each [num_kv_heads, head_dim].
                   PEFT puts these straight into the KV cache: the keys get no RoPE.
    PROMPT_TUNING, P_TUNING  [n, hidden]: input embeddings at positions 0..n-1, before the request's tokens.
"""
from __future__ import annotations

import os

import torch

from adapters.checkpoint import WEIGHTS_NAME, read_safetensors
from adapters.config import AdapterError, PromptLearningConfig, load_config
from adapters.interface import PrefixKV, VirtualTokens
from adapters.model_spec import ModelSpec

KEY = "prompt_embeddings"


def load_prompt_adapter(adapter_dir: str, spec: ModelSpec) -> PrefixKV | VirtualTokens:
    """A PREFIX_TUNING, PROMPT_TUNING or P_TUNING directory checked against the base `spec`; AdapterError
    naming the file and the mismatch otherwise."""
    config = load_config(adapter_dir)
    source = os.path.join(adapter_dir, "adapter_config.json")
    if not isinstance(config, PromptLearningConfig):
        raise AdapterError(f"{source}: peft_type {config.peft_type!r} is not a prompt-learning adapter")
    if config.num_transformer_submodules not in (None, 1):
        raise AdapterError(f"{source}: num_transformer_submodules={config.num_transformer_submodules} is for "
                           f"encoder-decoder models; a decoder-only base has 1")
    if not isinstance(config.num_virtual_tokens, int) or config.num_virtual_tokens < 1:
        raise AdapterError(f"{source}: num_virtual_tokens must be a positive integer, got "
                           f"{config.num_virtual_tokens!r}")
    tensors = read_safetensors(adapter_dir)
    path = os.path.join(adapter_dir, WEIGHTS_NAME)
    if KEY not in tensors:
        raise AdapterError(f"{path}: no {KEY!r} tensor (found: {', '.join(sorted(tensors)) or 'none'})")
    extra = sorted(set(tensors) - {KEY})
    if extra:
        raise AdapterError(f"{path}: unexpected tensor(s) {', '.join(extra)}; a {config.peft_type} checkpoint "
                           f"holds only {KEY!r}")
    table = tensors[KEY]
    if config.peft_type.upper() == "PREFIX_TUNING":
        return _prefix_kv(table, config, spec, source, path)
    return _virtual_tokens(table, config, spec, source, path)


def _prefix_kv(table: torch.Tensor, config: PromptLearningConfig, spec: ModelSpec, source: str,
               path: str) -> PrefixKV:
    n, layers = config.num_virtual_tokens, spec.num_layers
    if config.num_layers is not None and config.num_layers != layers:
        raise AdapterError(f"{source}: num_layers={config.num_layers}, but the base model has {layers} layers")
    token_dim = spec.num_kv_heads * spec.head_dim
    heads = config.num_attention_heads
    if heads is not None and heads != spec.num_kv_heads:
        hint = (" (PEFT < 0.12 sized prefixes by query heads; re-train with a newer PEFT for a GQA base)"
                if heads == spec.num_heads else "")
        raise AdapterError(f"{source}: num_attention_heads={heads}, but the base model's attention has "
                           f"{spec.num_kv_heads} key/value heads{hint}")
    if config.token_dim is not None and config.token_dim != token_dim:
        raise AdapterError(f"{source}: token_dim={config.token_dim}, but the base model's keys/values are "
                           f"{token_dim} wide ({spec.num_kv_heads} heads x {spec.head_dim})")
    expected = (n, layers * 2 * token_dim)
    if tuple(table.shape) != expected:
        raise AdapterError(f"{path}: {KEY} has shape {list(table.shape)}, expected {list(expected)} "
                           f"(num_virtual_tokens x num_layers * 2 * {token_dim})")
    kv = table.view(n, layers, 2, spec.num_kv_heads, spec.head_dim).permute(2, 1, 0, 3, 4)
    return PrefixKV(key=kv[0].contiguous(), value=kv[1].contiguous())


def _virtual_tokens(table: torch.Tensor, config: PromptLearningConfig, spec: ModelSpec, source: str,
                    path: str) -> VirtualTokens:
    if config.token_dim is not None and config.token_dim != spec.hidden_size:
        raise AdapterError(f"{source}: token_dim={config.token_dim}, but the base model's hidden size is "
                           f"{spec.hidden_size}")
    expected = (config.num_virtual_tokens, spec.hidden_size)
    if tuple(table.shape) != expected:
        raise AdapterError(f"{path}: {KEY} has shape {list(table.shape)}, expected {list(expected)} "
                           f"(num_virtual_tokens x hidden size)")
    return VirtualTokens(table.contiguous())
