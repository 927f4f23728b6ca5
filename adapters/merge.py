"""Fold an adapter into its base model and write an ordinary HF checkpoint (PEFT's `merge_and_unload`).

    peftserve merge --model BASE_DIR --adapter ADAPTER_DIR --out OUT_DIR

OUT_DIR gets every file of BASE_DIR except the weights (config.json, tokenizer files, generation config, chat
template, ...) and the weights with the adapter folded in, in BASE_DIR's own shard layout and dtypes. The fold
is computed in float32 from the tensors the server itself serves (adapters/lora.py: scaling, AdaLoRA's E and
DoRA's factor g folded in):
    W' = g * W + lora_b @ lora_a          (per row; g = 1 without DoRA)    every targeted linear and lm_head
    E' = E * g + lora_a @ lora_b.T        (g per hidden feature)           embed_tokens
With tied embeddings, an adapter on embed_tokens or lm_head unties them (config.json's tie_word_embeddings
becomes false, lm_head.weight is written): the unmerged adapter changes the input embedding and the output head
independently, and so must the merged model. (PEFT's merge_and_unload would change both through the shared
tensor.)

(IA)^3 vectors (PEFT's and AdapterHub's) scale W's rows and bias (output) or columns (input, feedforward modules);
BitFit biases replace the base's (a Llama base without biases gets attention_bias / mlp_bias set).
Kinds: FOLDERS maps an adapter kind (adapters/config.py: detect_kind) to a function folding it into the weight
dict; a kind without one (prefix / prompt tuning, which cannot be merged; bottleneck adapters) is a clear error. A mixture recipe is merged by
writing the mixture's checkpoint first (adapters/mixture.py), then folding it as LoRA.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig

from adapters.checkpoint import WEIGHTS_NAME, read_safetensors
from adapters.config import ADAPTERHUB_IA3, BITFIT, IA3, LORA, AdapterError, detect_kind, load_config
from adapters.model_spec import ModelSpec

PEFT_PREFIX = "base_model.model."
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
EMBED, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"
_BLOCK = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


class MergeError(ValueError):
    """The adapter cannot be folded into this base (the message says why)."""


class BaseWeights:
    """The base checkpoint's tensors by HF name, the shard each came from, and the float32 copies being merged."""

    def __init__(self, model_dir: str):
        self.model_dir = model_dir
        self.spec = ModelSpec.from_hf(AutoConfig.from_pretrained(model_dir))
        self.shards: dict[str, list[str]] = {}       # shard file name -> tensor names, in file order
        self.tensors: dict[str, torch.Tensor] = {}
        for shard in _shard_names(model_dir):
            with safe_open(os.path.join(model_dir, shard), framework="pt") as f:
                self.shards[shard] = list(f.keys())
                for name in f.keys():
                    self.tensors[name] = f.get_tensor(name)
        self.merged: dict[str, torch.Tensor] = {}      # name -> float32, only the tensors an adapter changed
        self.added: dict[str, str] = {}                # name -> shard of tensors the base does not have (biases)
        self.config_updates: dict[str, object] = {}    # config.json fields the merged model needs

    @staticmethod
    def hf_name(layer: int | None, module: str) -> str:
        if module == "embed_tokens":
            return EMBED
        if module == "lm_head":
            return LM_HEAD
        return f"model.layers.{layer}.{_BLOCK[module]}.{module}.weight"

    def base_weight(self, layer: int | None, module: str) -> torch.Tensor:
        """The original base weight [out, in] (embed_tokens: [vocab, hidden]); adapters/lora.py's BaseWeight."""
        name = self.hf_name(layer, module)
        if name == LM_HEAD and name not in self.tensors:        # tied: the head is the embedding
            name = EMBED
        return self.tensors[name]

    def base_weight_by_name(self, name: str) -> torch.Tensor:
        return self.tensors[name] if name in self.tensors else self.tensors[EMBED]

    def working(self, name: str) -> torch.Tensor:
        """The float32 tensor being merged into for HF weight `name` (lm_head starts as the tied embedding)."""
        if name not in self.merged:
            source = self.tensors[name] if name in self.tensors else self.tensors[EMBED]
            self.merged[name] = source.float().clone()
        return self.merged[name]


def fold_lora(adapter_dir: str, weights: BaseWeights) -> None:
    """LoRA, rsLoRA, DoRA, AdaLoRA (and mixtures, which are written as LoRA)."""
    from adapters.lora import load_lora
    adapter = load_lora(adapter_dir, weights.spec, weights.base_weight, dtype=torch.float32)
    parts = [((layer, name), mod) for (layer, name), mod in adapter.modules.items()]
    if adapter.lm_head is not None:
        parts.append(((None, "lm_head"), adapter.lm_head))
    for (layer, name), mod in parts:
        w = weights.working(weights.hf_name(layer, name))
        if mod.dora_scale is not None:
            w.mul_(mod.dora_scale.float()[:, None])
        w.add_(mod.lora_b.float() @ mod.lora_a.float())
    if adapter.embed is not None:
        e = weights.working(EMBED)
        if adapter.embed.dora_scale is not None:
            e.mul_(adapter.embed.dora_scale.float()[None, :])
        e.add_(adapter.embed.lora_a.float() @ adapter.embed.lora_b.float().T)


def fold_ia3(adapter_dir: str, weights: BaseWeights) -> None:
    """PEFT (IA)^3: `ia3_l` [1, in] on a feedforward module scales W's columns (its input); [out, 1] on another
    scales W's rows and the bias (its output). Key: "base_model.model.model.layers.0.mlp.down_proj.ia3_l"."""
    config = load_config(adapter_dir)
    source = os.path.join(adapter_dir, "adapter_config.json")
    if config.fan_in_fan_out or config.modules_to_save:
        raise AdapterError(f"{source}: fan_in_fan_out / modules_to_save are not supported")
    file = os.path.join(adapter_dir, WEIGHTS_NAME)
    tensors = read_safetensors(adapter_dir)
    if not tensors:
        raise AdapterError(f"{file}: no (IA)^3 vectors")
    for key, vector in tensors.items():
        if key.endswith(".base_layer.weight"):        # PEFT saves the tied head's base weight: must be the base's
            name = key[len(PEFT_PREFIX):-len(".base_layer.weight")] + ".weight"
            if name not in (LM_HEAD, EMBED) or not torch.equal(vector.to(weights.base_weight_by_name(name).dtype),
                                                               weights.base_weight_by_name(name)):
                raise AdapterError(f"{file}: {key} is not the base model's weight (trained or resized base "
                                   f"weights are not supported)")
            continue
        module = key[len(PEFT_PREFIX):-len(".ia3_l")] if key.startswith(PEFT_PREFIX) and key.endswith(".ia3_l") \
            else None
        name = None if module is None else module + ".weight"
        if name is None or (name not in weights.tensors and not (name == LM_HEAD and EMBED in weights.tensors)):
            raise AdapterError(f"{file}: unexpected key {key!r} (expected base_model.model.<linear module>.ia3_l)")
        out_f, in_f = weights.base_weight_by_name(name).shape
        feedforward = _is_feedforward(config.feedforward_modules, module)
        expected = (1, in_f) if feedforward else (out_f, 1)
        if tuple(vector.shape) != expected:
            raise AdapterError(f"{file}: {key} has shape {tuple(vector.shape)}, expected {expected} "
                               f"({'feedforward: the input' if feedforward else 'the output'} is scaled)")
        weights.working(name).mul_(vector.float())
        bias = module + ".bias"
        if not feedforward and bias in weights.tensors:
            weights.working(bias).mul_(vector.float().reshape(-1))


def _is_feedforward(feedforward_modules, module: str) -> bool:
    """PEFT's IA3Model._check_target_module_feedforward."""
    if feedforward_modules is None:
        return False
    if isinstance(feedforward_modules, str):
        return re.fullmatch(feedforward_modules, module) is not None
    return any(module.endswith(target) for target in feedforward_modules)


def fold_adapterhub_ia3(adapter_dir: str, weights: BaseWeights) -> None:
    """AdapterHub's (IA)^3 (adapters/adapterhub_ia3.py: `output` vectors scale a module's rows and bias, `input`
    vectors its columns; alpha folded in)."""
    from adapters.adapterhub_ia3 import load_adapterhub_ia3
    spec = weights.spec
    widths = {"q_proj": spec.q_size, "k_proj": spec.kv_size, "v_proj": spec.kv_size, "o_proj": spec.hidden_size,
              "gate_proj": spec.intermediate_size, "up_proj": spec.intermediate_size, "down_proj": spec.hidden_size}
    adapter = load_adapterhub_ia3(adapter_dir, widths, spec.num_layers, dtype=torch.float32)
    for (layer, module), scale in adapter.output.items():
        weights.working(weights.hf_name(layer, module)).mul_(scale[:, None])
        bias = weights.hf_name(layer, module).removesuffix(".weight") + ".bias"
        if bias in weights.tensors:
            weights.working(bias).mul_(scale)
    for (layer, module), scale in adapter.input.items():
        weights.working(weights.hf_name(layer, module)).mul_(scale[None, :])


# Bias flags of HF configs: which modules get a bias when the flag is set (Llama only; Mistral has none, Qwen2's
# q/k/v biases are always there and its other modules never have one).
BIAS_FLAGS = {"llama": {"attention_bias": ("q_proj", "k_proj", "v_proj", "o_proj"),
                        "mlp_bias": ("gate_proj", "up_proj", "down_proj")}}


def fold_bitfit(adapter_dir: str, weights: BaseWeights) -> None:
    """BitFit (adapters/bitfit.py): the adapter's biases replace the base's. A module of a base without biases
    gets one through its config flag (Llama's attention_bias / mlp_bias, zeros on the group's other modules);
    where no HF config can hold the bias (lm_head, Mistral, Qwen2's o_proj / MLP) the merge is refused."""
    from adapters.bitfit import load_bitfit
    spec = weights.spec

    def bias_name(layer, module):
        return weights.hf_name(layer, module).removesuffix(".weight") + ".bias"

    adapter = load_bitfit(adapter_dir, spec, lambda layer, module: weights.tensors.get(bias_name(layer, module)))
    flags = BIAS_FLAGS.get(spec.model_type, {})
    for (layer, module) in adapter.delta:
        if bias_name(layer, module) in weights.tensors:
            continue
        flag = next((f for f, modules in flags.items() if module in modules), None)
        if flag is None:
            raise AdapterError(f"{adapter_dir}: a bias on {module} cannot be written as a {spec.model_type} "
                               f"checkpoint (its config has no option for it); serve the adapter unmerged")
        weights.config_updates[flag] = True
        for i in range(spec.num_layers):                   # the flag gives every module of its group a bias
            for other in flags[flag]:
                name, weight = bias_name(i, other), weights.hf_name(i, other)
                if name not in weights.tensors and name not in weights.added:
                    weights.added[name] = next(s for s, names in weights.shards.items() if weight in names)
                    weights.merged[name] = torch.zeros(weights.tensors[weight].shape[0])
    for (layer, module), delta in adapter.delta.items():
        weights.working(bias_name(layer, module)).add_(delta.float())


# adapter kind -> fold(adapter_dir, weights).
FOLDERS: dict[str, Callable[[str, BaseWeights], None]] = {LORA: fold_lora, IA3: fold_ia3,
                                                          ADAPTERHUB_IA3: fold_adapterhub_ia3, BITFIT: fold_bitfit}


def merge_adapter(model_dir: str, adapter_dir: str, out_dir: str) -> str:
    """Write `model_dir` with the adapter in `adapter_dir` folded in to `out_dir` (created; must not exist or be
    empty). Returns out_dir."""
    _check_out(model_dir, out_dir)
    weights = BaseWeights(model_dir)
    try:
        kind = detect_kind(adapter_dir)
    except AdapterError as exc:
        raise MergeError(str(exc)) from None
    fold = FOLDERS.get(kind)
    if fold is None:
        raise MergeError(f"{adapter_dir}: merging {kind} adapters into the base is not supported (mergeable kinds: "
                         f"{', '.join(sorted(FOLDERS))}); prefix / prompt tuning add tokens and cannot be merged")
    try:
        fold(adapter_dir, weights)
    except AdapterError as exc:
        raise MergeError(str(exc)) from None
    _write(weights, out_dir)
    return out_dir


def merge_mixture(model_dir: str, recipe, member_dirs: list[str], out_dir: str) -> str:
    """A mixture (adapters/mixture.py MixtureRecipe over `member_dirs`) folded into `model_dir`."""
    from adapters.mixture import make_mixture
    _check_out(model_dir, out_dir)
    spec = ModelSpec.from_hf(AutoConfig.from_pretrained(model_dir))
    with tempfile.TemporaryDirectory(prefix="peftserve-mixture-") as tmp:
        make_mixture(recipe, member_dirs, spec, os.path.join(tmp, "mixture"))
        return merge_adapter(model_dir, os.path.join(tmp, "mixture"), out_dir)


def _shard_names(model_dir: str) -> list[str]:
    index = os.path.join(model_dir, INDEX_NAME)
    if os.path.isfile(index):
        with open(index) as f:
            return sorted(set(json.load(f)["weight_map"].values()))
    if os.path.isfile(os.path.join(model_dir, SINGLE_NAME)):
        return [SINGLE_NAME]
    raise MergeError(f"{model_dir}: no {SINGLE_NAME} or {INDEX_NAME} (merge needs a safetensors HF checkpoint)")


def _check_out(model_dir: str, out_dir: str) -> None:
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise MergeError(f"{model_dir}: not a Hugging Face model directory (no config.json)")
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise MergeError(f"{out_dir}: exists and is not an empty directory")
    if os.path.realpath(out_dir) == os.path.realpath(model_dir):
        raise MergeError("--out must differ from --model")


def _write(weights: BaseWeights, out_dir: str) -> None:
    """Into a temporary sibling, renamed into place at the end: a failed write leaves no half checkpoint."""
    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".merge-", dir=parent)
    try:
        weight_files = {INDEX_NAME, *weights.shards}
        for entry in os.listdir(weights.model_dir):
            src = os.path.join(weights.model_dir, entry)
            if entry not in weight_files and os.path.isfile(src):
                shutil.copy2(src, os.path.join(tmp, entry))
        untie = weights.spec.tie_word_embeddings and (LM_HEAD in weights.merged or EMBED in weights.merged)
        if untie:
            weights.working(LM_HEAD)           # the head keeps its own (unmerged or lm_head-merged) copy
        weight_map = {}
        for shard, names in weights.shards.items():
            if untie and EMBED in names and LM_HEAD not in weights.tensors:
                names = [*names, LM_HEAD]
            names = [*names, *(n for n, s in weights.added.items() if s == shard)]
            out = {}
            for name in names:
                original = weights.tensors.get(name)
                if original is None:                  # an untied head, or a bias the base lacks: the weight's dtype
                    original = weights.tensors[EMBED if name == LM_HEAD else name.removesuffix(".bias") + ".weight"]
                tensor = weights.merged.get(name)
                out[name] = original.contiguous() if tensor is None else tensor.to(original.dtype).contiguous()
                weight_map[name] = shard
            save_file(out, os.path.join(tmp, shard), metadata={"format": "pt"})
        if os.path.isfile(os.path.join(weights.model_dir, INDEX_NAME)):
            with open(os.path.join(weights.model_dir, INDEX_NAME)) as f:
                index = json.load(f)
            index["weight_map"] = weight_map
            with open(os.path.join(tmp, INDEX_NAME), "w") as f:
                json.dump(index, f, indent=2)
        if untie:
            weights.config_updates["tie_word_embeddings"] = False
        if weights.config_updates:
            path = os.path.join(tmp, "config.json")
            with open(path) as f:
                config = json.load(f)
            config.update(weights.config_updates)
            with open(path, "w") as f:
                json.dump(config, f, indent=2)
        os.chmod(tmp, 0o755)
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)                  # empty (checked)
        os.rename(tmp, out_dir)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
