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


# NF4 bases: bitsandbytes' CPU dequantize indexes block scales per row, so it is right only when every linear's
# in_features is a multiple of its block size (64); transformers itself wants multiples of 32.
NF4_COMMON = dict(COMMON, hidden_size=128, intermediate_size=256)
NF4_CONFIGS = {
    "llama-nf4": lambda: transformers.LlamaConfig(**NF4_COMMON, tie_word_embeddings=False),
    "qwen2-nf4": lambda: transformers.Qwen2Config(**NF4_COMMON, tie_word_embeddings=True),  # qkv bias, tied
}


def save_tiny_model(kind: str, path: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    config = {**CONFIGS, **NF4_CONFIGS}[kind]()
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


def load_hf_nf4(path: Path, double_quant: bool, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """transformers + bitsandbytes 4-bit NF4 on the CPU, computing in `dtype`. On AVX512-BF16 CPUs bitsandbytes
    swaps each layer at its first forward for a bf16 kernel (activations and scales rounded to bf16, whatever the
    compute dtype); that switch is turned off here so the reference computes what bitsandbytes does everywhere
    else (dequantize to the compute dtype, then the matmul)."""
    import bitsandbytes as bnb
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=dtype)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=config,
                                                              device_map="cpu").eval()
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model
