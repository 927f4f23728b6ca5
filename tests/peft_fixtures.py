"""Adapters made by `peft` itself on the tiny test models, saved with `save_pretrained`."""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model

from tests.tiny_models import load_hf


def randomize_adapter(peft_model, seed: int, std: float = 0.08) -> None:
    """PEFT initialises lora_B to zero (a no-op adapter); give every adapter tensor random values. Prompt
    encoders (prefix / prompt tuning, P-tuning) get noise added, so a TEXT init stays close to its text."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name and "magnitude" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif "prompt_encoder." in name:
                p.add_(torch.randn(p.shape, generator=g) * std)


def save_adapter(base_dir: Path, config, out: Path, seed: int) -> Path:
    model = get_peft_model(load_hf(base_dir), copy.deepcopy(config))
    randomize_adapter(model, seed)
    model.save_pretrained(out)
    return out


def load_peft(base_dir: Path, adapters: dict[str, Path]) -> PeftModel:
    """One PeftModel holding every adapter under its name (the reference for mixed batches)."""
    names = list(adapters)
    model = PeftModel.from_pretrained(load_hf(base_dir), adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    model.eval()
    return model


def greedy_full_forward(model, prompt: list[int], max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Greedy decoding by one full forward per new token (no KV cache): the reference for PEFT's prompt-learning
    adapters. Returns the new tokens and the logits each was chosen from, `[max_new_tokens, vocab]`.

    Why not `generate`: transformers 5.24 renamed the cache argument `past_key_values` -> `cache` and its
    `generate` always passes its own `cache`. PEFT (0.21) hands prefix tuning's virtual K/V to the base model as
    `past_key_values`; given both, transformers keeps `cache` and drops the prefix with only a FutureWarning, so
    `generate` on a prefix-tuned PeftModel silently runs the base model. Our engine is the side that is right.
    A plain forward passes the prefix alone (renamed to `cache`, with positions n.. after it), so full
    forwards give PEFT's real semantics on 5.23 and 5.24 alike.
    """
    ids = list(prompt)
    rows = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            row = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            rows.append(row)
            ids.append(int(row.argmax()))
    return ids[len(prompt):], torch.stack(rows)
