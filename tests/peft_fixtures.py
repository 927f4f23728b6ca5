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
