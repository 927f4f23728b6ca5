"""AdapterHub-format checkpoints for the benchmark model, written directly in the format `save_adapter` uses
(adapter_config.json + adapter.safetensors; see adapters/bottleneck.py, adapters/adapterhub_ia3.py), with random
weights: AdapterHub itself needs transformers 4.x, so it cannot run in this venv (the tests compare against its
real outputs, tests/fixtures/adapterhub)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from bench.common import CACHE

# the BnConfig fields save_adapter writes (SeqBnConfig defaults), overridden per kind below
BN_DEFAULTS = dict(adapter_residual_before_ln=False, cross_adapter=False, dropout=0.0, init_weights="bert",
                   inv_adapter=None, is_parallel=False, leave_out=[], ln_after=False, ln_before=False,
                   mh_adapter=False, non_linearity="relu", original_ln_after=True, original_ln_before=True,
                   output_adapter=True, phm_layer=False, reduction_factor=16, residual_before_ln=True, scaling=1.0,
                   use_gating=False)
KINDS = {
    "pfeiffer": {},
    "houlsby": dict(mh_adapter=True, original_ln_before=False, non_linearity="swish"),
    "parallel": dict(is_parallel=True, original_ln_before=False, reduction_factor=2, scaling=4.0),
}


def write_bottleneck(path: Path, kind: str, hidden: int, num_layers: int, seed: int) -> Path:
    config = {**BN_DEFAULTS, **KINDS[kind]}
    r = int(hidden // config["reduction_factor"])
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    locations = (["attention_adapters"] if config["mh_adapter"] else []) + ["output_adapters"]
    for layer in range(num_layers):
        for loc in locations:
            p = f"model.layers.{layer}.{loc}.adapters.{path.name}."
            tensors[p + "adapter_down.0.weight"] = torch.randn(r, hidden, generator=g) * 0.02
            tensors[p + "adapter_down.0.bias"] = torch.randn(r, generator=g) * 0.02
            tensors[p + "adapter_up.weight"] = torch.randn(hidden, r, generator=g) * 0.02
            tensors[p + "adapter_up.bias"] = torch.randn(hidden, generator=g) * 0.02
    return _save(path, config, tensors, hidden)


def write_ia3(path: Path, widths: dict[str, int], num_layers: int, seed: int) -> Path:
    """AdapterHub IA3Config's modules on Llama: k_proj, v_proj, down_proj."""
    config = dict(architecture="lora", composition_mode="scale", r=1, alpha=1, attn_matrices=["k", "v"],
                  selfattn_lora=True, intermediate_lora=True, output_lora=False, use_gating=False, dropout=0.0)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(num_layers):
        for block, module in (("self_attn", "k_proj"), ("self_attn", "v_proj"), ("mlp", "down_proj")):
            key = f"model.layers.{layer}.{block}.{module}.loras.{path.name}.lora_B"
            tensors[key] = 1 + 0.1 * torch.randn(widths[module], 1, generator=g)
    return _save(path, config, tensors, None)


def _save(path: Path, config: dict, tensors: dict, hidden: int | None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter.safetensors"))
    meta = {"config": config, "hidden_size": hidden, "model_class": "LlamaForCausalLM", "model_name": "bench",
            "model_type": "llama", "name": path.name, "version": "adapters.1.3.0"}
    (path / "adapter_config.json").write_text(json.dumps(meta, indent=2))
    return path


def make(kind: str, count: int, hidden: int, num_layers: int, widths: dict[str, int] | None = None) -> list[str]:
    """`count` adapters of `kind` ("pfeiffer", "houlsby", "parallel", "ia3") for the bench model, cached."""
    root = CACHE / f"adapterhub-{kind}-h{hidden}"
    paths = []
    for i in range(count):
        path = root / f"{kind}{i:03d}"
        if not (path / "adapter.safetensors").exists():
            if kind == "ia3":
                write_ia3(path, widths, num_layers, seed=i)
            else:
                write_bottleneck(path, kind, hidden, num_layers, seed=i)
        paths.append(str(path))
    return paths
