"""The base model's architecture facts, read from an HF `config.json` (Llama / Mistral / Qwen2 families).

Data only. It sits at the adapters layer because adapters are shaped by it (module widths, layer count, heads) and
the model above builds itself from it: imports flow api -> engine -> model -> adapters -> kernels, and nothing in
adapters/ or kernels/ imports from server/ (tests/test_import_layers.py)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED = ("llama", "mistral", "qwen2")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass
class ModelSpec:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    sliding_window: list[int | None]      # per layer: window size or None (full attention)
    inv_freq: torch.Tensor                # [head_dim // 2] float32 RoPE frequencies (scaling applied)
    rope_attention_scaling: float         # multiplies cos/sin (yarn); 1.0 otherwise
    bos_token_id: int | None
    eos_token_ids: list[int]
    torch_dtype: str | None

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf(cls, cfg) -> "ModelSpec":
        """`cfg`: a transformers PretrainedConfig (AutoConfig.from_pretrained(model_dir))."""
        model_type = getattr(cfg, "model_type", None)
        if model_type not in SUPPORTED:
            raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED)}")
        act = getattr(cfg, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r} (only silu)")
        num_heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads
        inv_freq, attn_scaling = _rope(cfg, head_dim)
        eos = getattr(cfg, "eos_token_id", None)
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        return cls(
            model_type=model_type,
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_layers=cfg.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=cfg.rms_norm_eps,
            max_position_embeddings=cfg.max_position_embeddings,
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bool(getattr(cfg, "attention_bias", False)),
            o_bias=model_type != "qwen2" and bool(getattr(cfg, "attention_bias", False)),
            mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
            sliding_window=_sliding_windows(cfg, model_type),
            inv_freq=inv_freq,
            rope_attention_scaling=attn_scaling,
            bos_token_id=getattr(cfg, "bos_token_id", None),
            eos_token_ids=eos_ids,
            torch_dtype=str(getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) or "") or None,
        )


def _rope(cfg, head_dim: int) -> tuple[torch.Tensor, float]:
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"unsupported rope_type {rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
    if rope_type == "default":
        base = params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)), 1.0
    # Same numbers as transformers' own models: reuse its frequency formulas (llama3, linear, yarn).
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](cfg, "cpu")
    return inv_freq.float(), float(scaling)


def _sliding_windows(cfg, model_type: str) -> list[int | None]:
    n = cfg.num_hidden_layers
    window = getattr(cfg, "sliding_window", None)
    if window is None:
        return [None] * n
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None:
        return [window if t == "sliding_attention" else None for t in layer_types]
    if model_type == "qwen2" and not getattr(cfg, "use_sliding_window", False):
        return [None] * n
    return [window] * n
