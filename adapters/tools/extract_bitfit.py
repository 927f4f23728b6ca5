"""Extract a BitFit adapter (adapters/bitfit.py) from a fine-tuned model and its base.

    python -m adapters.tools.extract_bitfit BASE_DIR FINETUNED_DIR OUT_DIR [--atol 0]

Both directories are HF checkpoints (*.safetensors, sharded or not; read directly, never pickles). Every
linear-layer bias of the fine-tuned model that differs from the base's (by more than --atol), or that the base
does not have, goes into OUT_DIR/adapter_model.safetensors as base_model.model.<module>.bias; adapter_config.json
gets peft_type "BITFIT", those modules as target_modules and the base's path. Refused (exit 2, one line): any
other tensor that differs (not a BitFit fine-tune), a changed bias outside the linear layers, no changed bias.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from adapters.bitfit import BLOCKS, PREFIX, SUFFIX
from adapters.checkpoint import WEIGHTS_NAME
from adapters.config import CONFIG_NAME

_LINEAR = re.compile(r"^(model\.layers\.\d+\.(self_attn|mlp)\.(\w+)|lm_head)\.bias$")


class ExtractError(ValueError):
    pass


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(p for p in Path(path).glob("*.safetensors") if p.name != WEIGHTS_NAME)
    if not files:
        raise ExtractError(f"{path}: no *.safetensors model files")
    tensors = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return tensors


def extract_bitfit(base_dir: Path, finetuned_dir: Path, out_dir: Path, atol: float = 0.0) -> list[str]:
    """Write the BitFit adapter; returns its target modules (HF module paths)."""
    base, tuned = read_checkpoint(base_dir), read_checkpoint(finetuned_dir)
    biases: dict[str, torch.Tensor] = {}
    for key, t in sorted(tuned.items()):
        old = base.get(key)
        if old is not None and old.shape != t.shape:
            raise ExtractError(f"{key}: shape {list(t.shape)} in the fine-tuned model, {list(old.shape)} in the base")
        changed = old is None or not torch.allclose(t.float(), old.float(), atol=atol, rtol=0)
        if not changed:
            continue
        m = _LINEAR.match(key)
        if m is None or (m[3] is not None and BLOCKS.get(m[3]) != m[2]):
            what = "a bias outside the linear layers" if key.endswith(".bias") else "not a bias"
            raise ExtractError(f"{key} differs from the base ({what}): not a BitFit fine-tune of this base")
        biases[key] = t.contiguous()
    missing = sorted(set(base) - set(tuned))
    if missing:
        raise ExtractError(f"the fine-tuned model lacks {len(missing)} tensor(s) of the base, e.g. {missing[0]}")
    if not biases:
        raise ExtractError("no linear-layer bias differs from the base: nothing to extract")
    out_dir.mkdir(parents=True, exist_ok=True)
    modules = [key[:-len(SUFFIX)] for key in biases]
    save_file({PREFIX + key: t for key, t in biases.items()}, str(out_dir / WEIGHTS_NAME))
    config = {"peft_type": "BITFIT", "target_modules": modules, "base_model_name_or_path": str(base_dir)}
    (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return modules


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m adapters.tools.extract_bitfit", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base", type=Path, help="the base model's HF checkpoint directory")
    ap.add_argument("finetuned", type=Path, help="the BitFit fine-tuned model's HF checkpoint directory")
    ap.add_argument("out", type=Path, help="where to write adapter_config.json and adapter_model.safetensors")
    ap.add_argument("--atol", type=float, default=0.0, help="a bias within this of the base's counts as unchanged")
    args = ap.parse_args(argv)
    try:
        modules = extract_bitfit(args.base, args.finetuned, args.out, args.atol)
    except ExtractError as e:
        print(f"extract_bitfit: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {len(modules)} bias(es)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
