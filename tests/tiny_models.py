"""Tiny random-weight HF checkpoints that mimic real configs (GQA, llama3 rope scaling, tied embeddings,
Mistral sliding window, Qwen2 qkv bias), saved with transformers' own save_pretrained."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
import transformers

COMMON = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=512, max_position_embeddings=512, rms_norm_eps=1e-6,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)

CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**COMMON, tie_word_embeddings=False),
    # Llama 3 style: llama3 rope scaling, large theta, tied embeddings (as Llama-3.2-1B)
    "llama3": lambda: transformers.LlamaConfig(
        **COMMON, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    # a window smaller than the test prompts, so the sliding mask really matters
    "mistral": lambda: transformers.MistralConfig(**COMMON, sliding_window=12, tie_word_embeddings=False),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, tie_word_embeddings=False),
}


def save_tiny_model(kind: str, path: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    config = CONFIGS[kind]()
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.float32).eval()
    # random init is small; widen it so logits are spread and greedy ties are unlikely
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif name.endswith("bias"):
                p.normal_(0, 0.05)
            else:                                       # RMSNorm weights
                p.uniform_(0.8, 1.2)
    model.save_pretrained(path, safe_serialization=True)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, path / f.name)
    return path


def load_hf(path: Path) -> torch.nn.Module:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None      # compare fixed-length greedy runs
    model.generation_config.pad_token_id = 0
    return model
