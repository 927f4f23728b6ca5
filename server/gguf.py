"""GGUF files (llama.cpp's format) -> HF model directories, dequantized, so the engine loads them like any other.

transformers' GGUF loader (with the `gguf` package) reads the architecture, the tokenizer with its chat template
and the tensors, dequantizing them; we write config.json + model.safetensors + tokenizer files in float32, which
holds every dequantized value exactly (Q4_*/Q8_0 blocks are fp16 scales times small integers).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from server.cache_dir import build_once, cache_root

ARCHITECTURES = ("llama", "mistral", "qwen2")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> None:
    """Write the HF directory for `gguf_path` into `out_dir` (which must exist)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (ValueError, KeyError, OSError) as exc:      # unknown architecture / quant type, not a GGUF file
        raise ValueError(f"cannot read GGUF file {gguf_path}: {exc}") from exc
    config = model.config.to_dict()
    if config.get("model_type") not in ARCHITECTURES:
        raise ValueError(f"{gguf_path}: architecture {config.get('model_type')!r} is not served "
                         f"(supported: {', '.join(ARCHITECTURES)})")
    # The weights we write are plain float32: the GGUF quantization is history, not a loading instruction.
    config.pop("quantization_config", None)
    config.pop("_model_name_or_path", None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tied = config.get("tie_word_embeddings", False)
    weights = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)


def ensure_gguf_model(gguf_path: str | Path, target: str | Path | None = None) -> str:
    """The HF directory for a GGUF file, converted once and cached (default: `gguf/<stem>-<sha256[:16]>` under
    the cache root, so an edited file is converted again)."""
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"no GGUF file at {gguf_path}")
    if target is None:
        target = cache_root() / "gguf" / f"{gguf_path.stem}-{file_sha256(gguf_path)[:16]}"
    return build_once(Path(target), lambda tmp: convert_gguf(gguf_path, tmp))
