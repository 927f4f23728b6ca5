"""The demo adapters that no library trains in this environment, as plain torch on the transformers model:

- BitFit: a trainable bias on every decoder linear (SmolLM2's have none, so each starts at 0), saved in our BitFit
  format (adapters/bitfit.py): adapter_config.json {"peft_type": "BITFIT", ...} + adapter_model.safetensors with
  "base_model.model.model.layers.{i}.self_attn.q_proj.bias" etc.
- A bottleneck adapter with AdapterHub's SeqBnConfig (Pfeiffer) options, computed as AdapterHub computes it and
  saved as `model.save_adapter` of `adapters` 1.x writes it (adapters/bottleneck.py): adapter_config.json with
  AdapterHub's "config" block + adapter.safetensors with
  "model.layers.{i}.output_adapters.adapters.{name}.adapter_down.0.weight" etc.

Each `attach_*` turns the base model into the adapted one and returns the trainable parameters; each `load_*`
rebuilds the adapted model from a saved directory, which is the reference the real-model tests hold our engine to.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from adapters.bottleneck import parse_math

BITFIT_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BITFIT_PREFIX = "base_model.model."

# AdapterHub 1.3's SeqBnConfig() as save_adapter writes it, with reduction_factor 16 (tests/fixtures/adapterhub/
# llama/seq_bn/adapter_config.json is one that library wrote)
SEQ_BN_CONFIG = {
    "adapter_residual_before_ln": False, "cross_adapter": False, "dropout": 0.0, "factorized_phm_W": True,
    "factorized_phm_rule": False, "hypercomplex_nonlinearity": "glorot-uniform", "init_weights": "bert",
    "init_weights_seed": None, "inv_adapter": None, "inv_adapter_reduction_factor": None, "is_parallel": False,
    "learn_phm": True, "leave_out": [], "ln_after": False, "ln_before": False, "mh_adapter": False,
    "non_linearity": "relu", "original_ln_after": True, "original_ln_before": True, "output_adapter": True,
    "phm_bias": True, "phm_c_init": "normal", "phm_dim": 4, "phm_init_range": 0.0001, "phm_layer": False,
    "phm_rank": 1, "reduction_factor": 16, "residual_before_ln": True, "scaling": 1.0, "shared_W_phm": False,
    "shared_phm_rule": True, "stochastic_depth": 0.0, "use_gating": False,
}


def attach_bitfit(model) -> dict[str, nn.Parameter]:
    """A zero bias on every decoder linear of `model` (which has none); HF module path -> the bias parameter."""
    biases = {}
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear) and path.rsplit(".", 1)[-1] in BITFIT_MODULES:
            assert module.bias is None, f"{path} already has a bias"
            module.bias = nn.Parameter(torch.zeros(module.out_features, dtype=module.weight.dtype))
            biases[path] = module.bias
    return biases


def save_bitfit(biases: dict[str, nn.Parameter], out: Path, base_name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "BITFIT", "target_modules": list(BITFIT_MODULES), "base_model_name_or_path": base_name}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file({BITFIT_PREFIX + path + ".bias": b.detach().contiguous() for path, b in biases.items()},
              str(out / "adapter_model.safetensors"))


def load_bitfit(model, adapter_dir: str):
    """`model` (a bias-free base) with the biases of a BitFit directory added to its linears' outputs by forward
    hooks: y = linear(x) + b, what attach_bitfit's biases compute, on any linear (also bitsandbytes' 4-bit ones,
    whose packed uint8 weight says nothing of the dtype a bias should have)."""
    modules = dict(model.named_modules())
    for key, bias in load_file(str(Path(adapter_dir) / "adapter_model.safetensors")).items():
        module = modules[key[len(BITFIT_PREFIX):-len(".bias")]]
        assert module.bias is None, key
        module.register_forward_hook(lambda _mod, _args, out, b=bias.float(): out + b.to(out.dtype))
    return model


class SeqBn(nn.Module):
    """AdapterHub's `Adapter` module for SeqBnConfig: adapter_down = Sequential(Linear, ReLU), adapter_up = Linear,
    "bert" init (weights N(0, 0.02), biases 0), scaling 1.0, no layer norms, no dropout at 0.0."""

    def __init__(self, hidden: int, reduction_factor: int):
        super().__init__()
        self.adapter_down = nn.Sequential(nn.Linear(hidden, hidden // reduction_factor), nn.ReLU())
        self.adapter_up = nn.Linear(hidden // reduction_factor, hidden)
        for linear in (self.adapter_down[0], self.adapter_up):
            nn.init.normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter_up(self.adapter_down(x))


def attach_seq_bn(model, config: dict = SEQ_BN_CONFIG) -> nn.ModuleList:
    """One SeqBn after every decoder layer's MLP, as AdapterHub's output adapter: with o the MLP's output and r the
    residual entering it, and these options (original_ln_before, residual_before_ln, original_ln_after; no
    adapter layer norms) AdapterHub's pre_forward / forward / post_forward give h = f(o + r) + o + r, and
    o + r is exactly what the transformers decoder layer returns, so a forward hook adds f(output) to it."""
    assert parse_math(config).coefficients == (1.0, 1.0, 0.0, 0.0, 1.0, 1.0), "hook written for SeqBn's options"
    hidden = model.config.hidden_size
    modules = nn.ModuleList(SeqBn(hidden, config["reduction_factor"]) for _ in model.model.layers)
    for layer, adapter in zip(model.model.layers, modules):
        layer.register_forward_hook(lambda _mod, _args, out, f=adapter: out + f(out))
    return modules


def save_seq_bn(modules: nn.ModuleList, out: Path, name: str, base_name: str, hidden: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    config = {"config": SEQ_BN_CONFIG, "hidden_size": hidden, "model_class": "LlamaForCausalLM",
              "model_name": base_name, "model_type": "llama", "name": name, "version": "adapters.1.3.0"}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    tensors = {f"model.layers.{i}.output_adapters.adapters.{name}.{key}": t.detach().contiguous()
               for i, m in enumerate(modules) for key, t in m.state_dict().items()}
    save_file(tensors, str(out / "adapter.safetensors"))


def load_seq_bn(model, adapter_dir: str):
    """`model` with the SeqBn adapter of an AdapterHub directory hooked in after every decoder layer's MLP."""
    saved = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    modules = attach_seq_bn(model, saved["config"])
    prefix = f"output_adapters.adapters.{saved['name']}."
    tensors = load_file(str(Path(adapter_dir) / "adapter.safetensors"))
    for i, m in enumerate(modules):
        m.load_state_dict({k: tensors[f"model.layers.{i}.{prefix}{k}"] for k in m.state_dict()})
    modules.to(model.dtype).requires_grad_(False)
    model.seq_bn = modules          # keep the modules alive with the model
    return model
