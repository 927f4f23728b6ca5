"""Reading adapter weights: `adapter_model.safetensors` only (never pickles), every tensor a finite float."""
from __future__ import annotations

import os

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from adapters.config import AdapterError

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "pytorch_adapter.bin", "pytorch_model.bin")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def read_safetensors(adapter_dir: str, name: str = WEIGHTS_NAME) -> dict[str, torch.Tensor]:
    """All tensors of `adapter_dir/name` on CPU, checked by `check_tensors`; AdapterError naming the file if
    it is absent (or only a pickle is there), truncated, corrupt, or holds a non-float or non-finite tensor."""
    path = os.path.join(adapter_dir, name)
    if not os.path.isfile(path):
        pickles = [p for p in PICKLE_NAMES if os.path.isfile(os.path.join(adapter_dir, p))]
        if pickles:
            raise AdapterError(f"{adapter_dir}: only {pickles[0]} (a pickle) found; we load {name} only, never "
                               f"pickles: re-save with save_pretrained(..., safe_serialization=True)")
        raise AdapterError(f"{adapter_dir}: no {name}")
    try:
        tensors = load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterError(f"{path}: truncated or corrupt safetensors file: {e}") from None
    check_tensors(tensors, path)
    return tensors


def check_tensors(tensors: dict[str, torch.Tensor], path: str) -> None:
    for key, t in tensors.items():
        if t.dtype not in FLOAT_DTYPES:
            raise AdapterError(f"{path}: {key} has dtype {t.dtype}; adapter weights must be float16, bfloat16, "
                               f"float32 or float64")
        if t.numel() and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise AdapterError(f"{path}: {key} has {bad} NaN/inf value(s)")
